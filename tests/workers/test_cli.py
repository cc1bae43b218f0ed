"""`kvmesh worker`: flags and KVMESH_WORKER_* variables into WorkerConfig, and a real worker
process (SmolLM2) with bearer-token auth that stops cleanly on SIGTERM."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.deploy.cli import build_parser, command
from kvmesh.workers.cli import Serving, config_from_args, serving_from_args
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.errors import InvalidConfig
from kvmesh.workers.service.client import WorkerClient, WorkerError

LISTENING = re.compile(r"^kvmesh worker listening on (127\.0\.0\.1:\d+)\n$")


def _args(*argv: str):
    argv = ("worker", *argv)
    return build_parser(list(argv)).parse_args(list(argv))


def test_flags_override_environment_which_overrides_defaults():
    env = {
        "KVMESH_WORKER_PAGE_SIZE": "32",
        "KVMESH_WORKER_MAX_NUM_SEQS": "5",
        "KVMESH_WORKER_ENFORCE_EAGER": "true",
        "KVMESH_WORKER_STORE": "127.0.0.1:7001",
        "KVMESH_WORKER_PORT": "6001",
        "KVMESH_WORKER_TOKEN": "env-token",
    }
    args = _args("--max-num-seqs", "9", "--kv-cache-bytes", "1048576", "--port", "0")
    config = config_from_args(args, env)
    assert config.page_size == 32  # env
    assert config.max_num_seqs == 9  # flag beats env
    assert config.kv_cache_bytes == 1 << 20
    assert config.enforce_eager is True
    assert config.store == "127.0.0.1:7001"
    assert config.model == "smollm2"  # default
    assert serving_from_args(args, env) == Serving("127.0.0.1", 0, "env-token")


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="KVMESH_WORKER_PAGE_SIZE"):
        config_from_args(_args(), {"KVMESH_WORKER_PAGE_SIZE": "sixteen"})
    with pytest.raises(ValueError, match="KVMESH_WORKER_ENFORCE_EAGER"):
        config_from_args(_args(), {"KVMESH_WORKER_ENFORCE_EAGER": "maybe"})
    with pytest.raises(InvalidConfig, match="page_size must be a power of two"):
        config_from_args(_args("--page-size", "12"), {})
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        serving_from_args(_args("--tls-cert", __file__), {})
    with pytest.raises(ValueError, match="port must be in"):
        serving_from_args(_args(), {"KVMESH_WORKER_PORT": "70000"})
    with pytest.raises(ValueError, match="torch_threads"):
        serving_from_args(_args(), {"KVMESH_WORKER_TORCH_THREADS": "0"})
    assert serving_from_args(_args("--torch-threads", "3"), {}).torch_threads == 3
    with pytest.raises(InvalidConfig, match=r"decode_steps must be in \[1, 64\], got 0"):
        config_from_args(_args("--decode-steps", "0"), {})


def test_decode_steps_from_flag_or_environment_default_is_auto():
    assert config_from_args(_args(), {}).decode_steps is None  # 8 with CUDA graphs, else 1
    assert config_from_args(_args(), {"KVMESH_WORKER_DECODE_STEPS": "4"}).decode_steps == 4
    assert config_from_args(_args("--decode-steps", "16"),
                            {"KVMESH_WORKER_DECODE_STEPS": "4"}).decode_steps == 16


def test_bad_flag_exits_2_with_a_clear_message_and_no_traceback():
    proc = subprocess.run(
        [*command(), "worker", "--device", "tpu", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "kvmesh worker: device must be 'cpu' or 'cuda[:N]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _self_signed(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("grpc_server", ["sync", "aio"])
def test_worker_process_serves_tls_with_token_and_stops_on_sigterm(tmp_path, grpc_server):
    cert, key = _self_signed(tmp_path)
    env = {**os.environ, "KVMESH_WORKER_MAX_MODEL_LEN": "256", "KVMESH_WORKER_TLS_KEY": key}
    stderr = open(tmp_path / "stderr", "w+")  # a file, not a pipe: model loading logs a lot
    proc = subprocess.Popen(
        [*command(), "worker", "--port", "0", "--token", "s3cret", "--grpc-server", grpc_server,
         "--tls-cert", cert, "--kv-cache-bytes", str(64 << 20), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()
        assert LISTENING.match(line), (line, (tmp_path / "stderr").read_text())
        address = LISTENING.match(line).group(1)
        credentials = grpc.ssl_channel_credentials(open(cert, "rb").read())
        with grpc.secure_channel(address, credentials) as channel:  # health needs no token
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="kvmesh.v1.Worker"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with WorkerClient(address, tls=cert) as anonymous:
            with pytest.raises(WorkerError) as info:
                anonymous.stats()
            assert info.value.code == "UNAUTHENTICATED"
        with WorkerClient(address, token="wrong", tls=cert) as wrong:
            with pytest.raises(WorkerError) as info:
                list(wrong.generate([1, 2, 3]))
            assert info.value.code == "UNAUTHENTICATED"
        with WorkerClient(address, token="s3cret") as plaintext:  # no TLS: cannot talk
            with pytest.raises(WorkerError) as info:
                plaintext.stats(timeout=5)
            assert info.value.is_unavailable
        with WorkerClient(address, token="s3cret", tls=cert) as client:
            assert client.stats().max_model_len == 256  # from the environment
            got = [o.token_ids for o in client.generate(
                [1, 2, 3], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))]
            assert sum(len(ids) for ids in got) == 2
            # SIGTERM with a request in flight: its stream ends UNAVAILABLE (a router retries
            # elsewhere) and the process exits 0.
            outputs = client.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=200,
                                                                ignore_eos=True))
            next(outputs)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(WorkerError) as info:
                list(outputs)
            assert info.value.is_unavailable, info.value
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
