"""Request parsing, config checks and the error table: every bad field gets a clear 4xx."""

from __future__ import annotations

import argparse

import pytest

from kvmesh.router.config import RouterConfig, add_arguments, config_from_args
from kvmesh.router.errors import (
    InvalidConfig,
    InvalidRequest,
    ModelNotFound,
    NoWorkerAvailable,
    Overloaded,
    PromptTooLong,
    Unauthenticated,
    error_body,
    http_status,
)
from kvmesh.router.http.protocol import parse_request
from kvmesh.router.requests import Sampling
from kvmesh.router.service import tenant_salt

MESSAGES = [{"role": "user", "content": "hi"}]


def test_completion_defaults_and_fields():
    parsed = parse_request({"prompt": "hello"}, is_chat=False)
    assert parsed.sampling == Sampling(max_tokens=16)
    assert parsed.prompt == "hello" and not parsed.stream
    parsed = parse_request({"prompt": [[1, 2, 3]], "max_tokens": 5, "temperature": 0,
                            "top_p": 0.5, "top_k": -1, "n": 2, "stop": "\n", "seed": 7,
                            "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}, "user": "u"},
                           is_chat=False)
    assert parsed.prompt == (1, 2, 3)
    assert parsed.sampling == Sampling(max_tokens=5, temperature=0.0, top_p=0.5, top_k=0, n=2,
                                       stop=("\n",), seed=7, ignore_eos=True)
    assert parsed.include_usage and parsed.user == "u"


def test_chat_max_completion_tokens_and_content_parts():
    parsed = parse_request({"messages": [
        {"role": "developer", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ], "max_tokens": 9, "max_completion_tokens": 4}, is_chat=True)
    assert parsed.sampling.max_tokens == 4
    assert parsed.messages == ({"role": "system", "content": "be terse"},
                               {"role": "user", "content": "ab"})
    assert parse_request({"messages": MESSAGES}, is_chat=True).sampling.max_tokens is None


@pytest.mark.parametrize("body, is_chat, param", [
    ([1, 2], False, None),
    ({}, False, "prompt"),
    ({"prompt": ""}, False, "prompt"),
    ({"prompt": ["a", "b"]}, False, "prompt"),
    ({"prompt": [1, -2]}, False, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, False, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, False, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, False, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, False, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, False, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, False, "temperature"),
    ({"prompt": "x", "top_p": 0}, False, "top_p"),
    ({"prompt": "x", "top_k": -5}, False, "top_k"),
    ({"prompt": "x", "n": 17}, False, "n"),
    ({"prompt": "x", "seed": -1}, False, "seed"),
    ({"prompt": "x", "stop": ["a", 1]}, False, "stop"),
    ({"prompt": "x", "stop": [""]}, False, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, False, "stream_options"),
    ({"prompt": "x", "model": 3}, False, "model"),
    ({"messages": []}, True, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, True, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, True, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, True, "messages"),
    ({"messages": MESSAGES, "max_completion_tokens": -3}, True, "max_completion_tokens"),
    ({"prompt": "x"}, True, "messages"),
])
def test_bad_fields_are_invalid_requests_naming_the_field(body, is_chat, param):
    with pytest.raises(InvalidRequest) as info:
        parse_request(body, is_chat=is_chat)
    assert info.value.param == param
    assert http_status(info.value) == (400, "invalid_request_error")


def test_error_table():
    assert http_status(Unauthenticated("x")) == (401, "authentication_error")
    assert http_status(ModelNotFound("x")) == (404, "invalid_request_error")
    assert http_status(PromptTooLong("x"))[0] == 400
    assert http_status(Overloaded("x"))[0] == 429
    assert http_status(NoWorkerAvailable("x"))[0] == 503
    assert error_body(ModelNotFound("no such model", param="model")) == {"error": {
        "message": "no such model", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}}


def test_tenant_salt_is_server_derived_and_distinct():
    assert tenant_salt("s", "") == ""
    assert tenant_salt("s", "alice") == tenant_salt("s", "alice")
    assert len({tenant_salt("s", "alice"), tenant_salt("s", "bob"),
                tenant_salt("t", "alice")}) == 3


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_config_flags_beat_env_and_are_checked(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    env = {"KVMESH_ROUTER_WORKERS": "h:1,h:2", "KVMESH_ROUTER_PORT": "9000",
           "KVMESH_ROUTER_API_KEYS": "k1=alice,k2", "KVMESH_ROUTER_MODEL_PATH": str(model),
           "KVMESH_ROUTER_SECRET": "s3cret"}
    config = config_from_args(_args(), env)
    assert config.workers == ("h:1", "h:2") and config.port == 9000
    assert dict(config.api_keys) == {"k1": "alice", "k2": "k2"}
    config = config_from_args(_args("--worker", "w:3", "--port", "0", "--api-key", "z"), env)
    assert config.workers == ("w:3",) and config.port == 0 and dict(config.api_keys) == {"z": "z"}
    with pytest.raises(InvalidConfig, match="KVMESH_ROUTER_PORT"):
        config_from_args(_args(), {**env, "KVMESH_ROUTER_PORT": "eighty"})
    no_secret = {k: v for k, v in env.items() if k != "KVMESH_ROUTER_SECRET"}
    with pytest.raises(InvalidConfig, match="tenant secret"):  # never a constant secret
        config_from_args(_args(), no_secret)
    for bad_keys in ("k 1=alice", "=alice", "k1="):
        with pytest.raises(InvalidConfig, match="KEY=TENANT"):
            config_from_args(_args(), {**env, "KVMESH_ROUTER_API_KEYS": bad_keys})
    for bad in ({"workers": ()}, {"workers": ("nohost",)}, {"workers": ("h:1", "h:1")},
                {"port": 70000}, {"balance_rel": 0.5}, {"max_attempts": 0},
                {"model_path": str(tmp_path / "missing")}):
        with pytest.raises(InvalidConfig):
            RouterConfig(**{"workers": ("h:1",), "model_path": str(model), **bad})


def test_http_settings_from_flags_and_env(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    env = {"KVMESH_ROUTER_WORKERS": "h:1", "KVMESH_ROUTER_MODEL_PATH": str(model)}
    config = config_from_args(_args(), env)
    assert config.split_special_tokens and config.max_prompt_chars == 0
    config = config_from_args(_args("--no-split-special-tokens", "--max-prompt-chars", "500",
                                    "--read-timeout", "2.5"), env)
    assert not config.split_special_tokens and config.max_prompt_chars == 500
    assert config.read_timeout_s == 2.5
    config = config_from_args(_args(), {**env, "KVMESH_ROUTER_SPLIT_SPECIAL_TOKENS": "false",
                                        "KVMESH_ROUTER_MAX_BODY_BYTES": "1024"})
    assert not config.split_special_tokens and config.max_body_bytes == 1024
    with pytest.raises(InvalidConfig, match="SPLIT_SPECIAL_TOKENS"):
        config_from_args(_args(), {**env, "KVMESH_ROUTER_SPLIT_SPECIAL_TOKENS": "maybe"})
    for bad in ({"max_prompt_chars": -1}, {"max_body_bytes": 0}, {"read_timeout_s": 0},
                {"num_tokenizer_threads": 0}):
        with pytest.raises(InvalidConfig):
            RouterConfig(**{"workers": ("h:1",), "model_path": str(model), **bad})
