"""Peers store_bench.py runs from its own process: Redis (redis-py + hiredis, a real
`redis-server` started on a free port), the in-process memcpy ceiling, and `DriverPeer`, the
client side of a driver running in the peers' venv (peer_protocol)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
from peer_protocol import LOOKUP_KEYS, NUM_PAGES, SIZES, free_port, page_buffer, timed


class RedisPeer:
    """One SET / GET per page, NUM_PAGES per pipeline; lookup: EXISTS x LOOKUP_KEYS pipelined."""

    name = "Redis (redis-py + hiredis, pipelines of 128)"
    put_is_own_path = True

    def __init__(self) -> None:
        import redis

        if shutil.which("redis-server") is None:
            raise RuntimeError("no redis-server on PATH")
        port = free_port()
        self._server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        self.server_pids = [self._server.pid]
        self._redis = redis.Redis(port=port)
        for _ in range(100):
            try:
                self._redis.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        buffer = memoryview(page_buffer())
        self._pages = {
            size: [(f"{size}/{i}", buffer[i * nbytes : (i + 1) * nbytes]) for i in range(NUM_PAGES)]
            for size, nbytes in SIZES.items()
        }

    def put(self, size: str) -> float:
        t0 = time.perf_counter()
        pipe = self._redis.pipeline(transaction=False)
        for key, page in self._pages[size]:
            pipe.set(key, page)
        pipe.execute()
        return time.perf_counter() - t0

    def get(self, size: str) -> float:
        t0 = time.perf_counter()
        pipe = self._redis.pipeline(transaction=False)
        for key, _ in self._pages[size]:
            pipe.get(key)
        values = pipe.execute()
        seconds = time.perf_counter() - t0
        assert len(values[-1]) == SIZES[size]
        return seconds

    def lookup(self, num_calls: int) -> list[float]:
        keys = [f"lookup/{i}" for i in range(LOOKUP_KEYS)]
        self._redis.mset(dict.fromkeys(keys, b"x"))

        def exists() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            assert all(pipe.execute())

        return [timed(exists) for _ in range(num_calls)]

    def cleanup(self) -> None:
        self._redis.delete(*[key for size in SIZES for key, _ in self._pages[size]])

    def close(self) -> None:
        self._redis.close()
        self._server.terminate()
        self._server.wait(timeout=30)


class MemcpyPeer:
    """numpy copyto of the same bytes in this process: the ceiling of any same-host path."""

    name = "memcpy (numpy, in-process)"
    put_is_own_path = True
    server_pids: list[int] = []

    def __init__(self) -> None:
        self._client, self._store = (
            page_buffer(),
            np.zeros(NUM_PAGES * max(SIZES.values()), dtype=np.uint8),
        )

    def put(self, size: str) -> float:
        nbytes = NUM_PAGES * SIZES[size]
        return timed(np.copyto, self._store[:nbytes], self._client[:nbytes])

    def get(self, size: str) -> float:
        nbytes = NUM_PAGES * SIZES[size]
        return timed(np.copyto, self._client[:nbytes], self._store[:nbytes])

    def lookup(self, num_calls: int) -> list[float]:
        return []

    def cleanup(self) -> None:
        pass

    def close(self) -> None:
        pass


class DriverPeer:
    """A peer served by a driver script (peer_protocol) under another Python: the peers' venv.
    Raises RuntimeError if the driver cannot start; its stderr goes to `log_path`."""

    put_is_own_path = True

    def __init__(
        self,
        name: str,
        python: str,
        script: str,
        log_path: str,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [python, script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        hello = self._read()
        if "error" in hello:
            self.close()
            raise RuntimeError(hello["error"])
        self.server_pids = hello["server_pids"]

    def _read(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"driver exited (rc {self._proc.wait()}); see {self._log.name}")
        return json.loads(line)

    def _call(self, **request: Any) -> dict[str, Any]:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def put(self, size: str) -> float:
        return self._call(op="put", size=size)["seconds"]

    def get(self, size: str) -> float:
        return self._call(op="get", size=size)["seconds"]

    def lookup(self, num_calls: int) -> list[float]:
        return self._call(op="lookup", num_calls=num_calls)["seconds"]

    def cleanup(self) -> None:
        self._call(op="cleanup")

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


def peers_python(venv: str) -> str | None:
    python = os.path.join(venv, "bin", "python")
    return python if os.access(python, os.X_OK) else None


def print_note(note: str) -> None:
    print(f"  skipped: {note}", file=sys.stderr, flush=True)
