"""A kvmesh stack in subprocesses for the router tests: `Proc` runs one `kvmesh` role and
reads its listening line; `Stack` is a store, workers (two by default) and a router."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from kvmesh.deploy.cli import command

START_TIMEOUT_S = 300.0
API_KEYS = {"key-alice": "alice", "key-bob": "bob"}


class Proc:
    """A `kvmesh` subprocess whose stdout is watched for `... listening on HOST:PORT`."""

    def __init__(self, args: list[str], log_path: str) -> None:
        self.args = args
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            command(*args), stdout=subprocess.PIPE,
            stderr=self._log, start_new_session=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.address = ""

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self._lines.put(raw.decode(errors="replace"))

    def wait_listening(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            match = re.search(r"listening on (\S+:\d+)", line)
            if match:
                self.address = match.group(1)
                return self.address
        self.stop()
        log = open(self._log.name, errors="replace").read()[-3000:]
        raise RuntimeError(f"{self.args[0]} did not start (rc={self.popen.returncode}):\n{log}")

    def kill(self) -> None:
        """SIGKILL: the process dies without any goodbye, as a crashed worker would."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def sse_events(url: str, body: dict, headers: dict[str, str]) -> Iterator[dict]:
    """The data events of a streamed POST to `url` (an OpenAI-style SSE response), each
    checked to be no error."""
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            yield event


@dataclass
class Stack:
    url: str
    store: Proc
    workers: list[Proc]
    router: Proc

    def client(self, key: str | None = "key-alice") -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300.0)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a /metrics sample over every series whose labels include `labels`."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.contextmanager
def running_stack(prefix: str, worker_args: list[str], roles: tuple[str, ...] = ("both", "both"),
                  router_args: tuple[str, ...] = ()) -> Iterator[Stack]:
    """`kvmesh store`, a `kvmesh worker` per role in `roles` ("both", "prefill" or "decode";
    SmolLM2 on CPU, writing through to the store, with `worker_args`) and `kvmesh router` with
    API_KEYS and `router_args`, all on port 0; yields once every worker is healthy, stops
    everything on exit."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    procs: list[Proc] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        store = Proc(["store", "--port", "0", "--cpu-bytes", "256M"], f"{tmp}/store.log")
        procs.append(store)
        store_addr = store.wait_listening(deadline)
        workers = [Proc(["worker", "--port", "0", "--store", store_addr, *worker_args,
                         *(["--role", role] if role != "both" else [])],
                        f"{tmp}/worker{i}.log") for i, role in enumerate(roles)]
        procs += workers
        worker_addrs = [w.wait_listening(deadline) for w in workers]
        keys = [arg for key, tenant in API_KEYS.items() for arg in ("--api-key", f"{key}={tenant}")]
        flags = {"both": "--worker", "prefill": "--prefill-worker", "decode": "--decode-worker"}
        router = Proc(["router", "--port", "0", "--store", store_addr, "--secret", "test-secret",
                       *[a for w, role in zip(worker_addrs, roles, strict=True)
                         for a in (flags[role], w)], *keys, *router_args],
                      f"{tmp}/router.log")
        procs.append(router)
        url = "http://" + router.wait_listening(deadline)
        while time.monotonic() < deadline:  # every worker healthy and indexed
            health = httpx.get(url + "/health", timeout=30).json()
            if all(health["workers"].values()) and len(health["workers"]) == len(roles):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"workers not healthy: {health}")
        yield Stack(url, store, workers, router)
    finally:
        for proc in reversed(procs):
            proc.stop()
