"""`kvmesh serve` in a subprocess on a free port: the stack the serve and packaging tests drive."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

from kvmesh.deploy.cli import command

MAX_MODEL_LEN = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, data_dir: Path, *extra: str, cmd: list[str] | None = None,
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.stderr_path = data_dir.parent / f"{data_dir.name}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [*(cmd or command()), "serve", "--port", str(self.port),
             "--data-dir", str(data_dir), "--store-cpu-bytes", str(256 << 20),
             "--worker-arg=--max-model-len", f"--worker-arg={MAX_MODEL_LEN}",
             "--worker-arg=--kv-cache-bytes", f"--worker-arg={128 << 20}", *extra],
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("kvmesh serving on "):
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> str:
        assert self._ready.wait(timeout), f"not ready in {timeout} s: {self.stderr()}"
        assert self.lines, f"kvmesh serve exited {self.proc.poll()}: {self.stderr()}"
        return self.lines[0]

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:]

    def child_pids(self, marker: str = "") -> list[int]:
        """Live (not zombie) children of `kvmesh serve` whose command line contains `marker`."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == self.proc.pid and fields[0] != "Z" and marker in cmdline:
                pids.append(int(entry.name))
        return pids

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
