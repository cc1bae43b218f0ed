"""`kvmesh router --processes 2`: two real serving processes on one port (SO_REUSEPORT) under a
parent. No worker is needed for what is checked here (the router listens after --ready-timeout
and answers /health and /metrics without one): port 0 resolved once for both, one listening
line after both listen, a killed process restarted while the other serves, its live gauges
dropped from the merged metrics, a crash loop stopping all with exit code 1. Completions through
both processes, and SIGTERM, run in tests/deploy/test_serve_router_processes.py."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from live_stack import Proc

from kvmesh.router.config import add_arguments, auto_processes, config_env, config_from_args
from kvmesh.router.errors import InvalidConfig
from kvmesh.router.processes import (
    PROCESS_HEADER,
    RESTART_LIMIT,
    RESTART_WINDOW_S,
    reserve_port,
)

UNREACHABLE_WORKER = "127.0.0.1:1"


def _children(pid: int) -> list[int]:
    """Live (not zombie) children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def _is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _listening_pids(port: int, pids: list[int]) -> list[int]:
    """Those of `pids` holding a TCP socket that listens on `port` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    holders = []
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except FileNotFoundError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                holders.append(pid)
                break
    return holders


def _served_by(url: str, path: str = "/health") -> str:
    """The serving process of one request on a fresh connection."""
    response = httpx.get(url + path, timeout=30)  # no pool: a new connection each call
    return response.headers[PROCESS_HEADER]


def _metrics_dir(pid: int) -> Path:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    values = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    return Path(values["PROMETHEUS_MULTIPROC_DIR"])


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    log = tmp_path_factory.mktemp("router") / "router.log"
    proc = Proc(["router", "--worker", UNREACHABLE_WORKER, "--port", "0", "--processes", "2",
                 "--ready-timeout", "0.5"], str(log))
    try:
        proc.wait_listening(time.monotonic() + 300)
        yield proc
    finally:
        proc.stop()


def test_port_0_is_one_port_both_processes_listen_on_before_the_line(router):
    port = int(router.address.rsplit(":", 1)[1])
    assert port != 0
    children = _children(router.popen.pid)
    assert len(children) == 2
    # both listen when the line is out; the parent only holds the port (bound, not listening)
    assert _listening_pids(port, [router.popen.pid, *children]) == children


def test_both_processes_answer_on_the_one_port(router):
    url = f"http://{router.address}"
    seen = set()
    for _ in range(64):  # the kernel hashes each new connection to one of the two
        seen.add(_served_by(url))
        if len(seen) == 2:
            break
    assert seen == {"0", "1"}


def test_a_killed_process_is_restarted_while_the_other_serves(router):
    url = f"http://{router.address}"
    old = _children(router.popen.pid)
    metrics_dir = _metrics_dir(old[0])
    # each process has recorded its live in-flight gauge (0) by now
    assert {p.name for p in metrics_dir.glob(f"gauge_livesum_{old[0]}.db")}
    os.kill(old[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{old[0]}").exists():  # reaped: every thread gone, its socket closed
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for _ in range(8):  # the survivor takes every new connection
        assert httpx.get(url + "/health", timeout=30).status_code == 503  # no worker, served
    deadline = time.monotonic() + 120
    while len(new := _children(router.popen.pid)) < 2 or old[1] not in new:
        assert time.monotonic() < deadline, "the killed process was not restarted"
        time.sleep(0.2)
    restarted = next(pid for pid in new if pid != old[1])
    seen = set()
    while len(seen) < 2:  # the restarted process listens again, under its old index
        assert time.monotonic() < deadline, seen
        seen.add(_served_by(url))
    assert not list(metrics_dir.glob(f"gauge_livesum_{old[0]}.db"))  # marked dead
    assert list(metrics_dir.glob(f"counter_{old[0]}.db"))  # what it counted stays counted
    port = int(router.address.rsplit(":", 1)[1])
    assert sorted(_listening_pids(port, [old[1], restarted])) == sorted([old[1], restarted])


def test_a_crash_loop_stops_the_router_with_exit_code_1(router):
    """More than RESTART_LIMIT exits within RESTART_WINDOW_S: the router stops everything."""
    metrics_dir = _metrics_dir(_children(router.popen.pid)[0])
    killed: list[int] = []
    deadline = time.monotonic() + 60
    while router.popen.poll() is None:
        assert time.monotonic() < deadline and len(killed) <= RESTART_LIMIT + 1, killed
        fresh = [pid for pid in _children(router.popen.pid) if pid not in killed]
        if fresh:
            os.kill(fresh[0], signal.SIGKILL)
            killed.append(fresh[0])
        time.sleep(0.05)
    assert router.popen.wait(30) == 1
    assert not any(Path(f"/proc/{pid}").exists() for pid in killed)
    assert _children(router.popen.pid) == []
    assert not metrics_dir.exists()  # the router's own folder is removed
    lines = []
    while not router._lines.empty():
        lines.append(router._lines.get())
    assert not [line for line in lines if "listening on" in line], lines  # printed once
    log = Path(router._log.name).read_text()
    assert f"exit within {RESTART_WINDOW_S:.0f} s; stopping" in log


def test_a_taken_port_is_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            reserve_port("127.0.0.1", taken.getsockname()[1])
    held = reserve_port("127.0.0.1", 0)
    with held, socket.socket() as server:  # a serving process binds the held port
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        server.bind(("127.0.0.1", held.getsockname()[1]))
        server.listen()


def _parse(*argv: str, env: dict[str, str] | None = None):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--worker", "127.0.0.1:5", *argv]),
                            env={} if env is None else env)


def test_processes_flag_env_and_auto():
    assert [auto_processes(n) for n in (1, 2, 7, 8, 15, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]
    assert _parse().num_processes == 1  # the CLI's default
    assert _parse("--processes", "auto").num_processes == auto_processes()
    assert _parse("--processes", "3").num_processes == 3
    assert _parse(env={"KVMESH_ROUTER_PROCESSES": "2"}).num_processes == 2
    for bad in ("0", "-1", "many"):
        with pytest.raises(InvalidConfig, match="auto or a count"):
            _parse("--processes", bad)
        with pytest.raises(InvalidConfig, match="KVMESH_ROUTER_PROCESSES"):
            _parse(env={"KVMESH_ROUTER_PROCESSES": bad})


def test_config_env_rebuilds_the_config_with_its_secrets():
    config = _parse("--prefill-worker", "127.0.0.1:6", "--decode-worker", "127.0.0.1:7",
                    "--api-key", "k1=alice", "--api-key", "k2", "--secret", "s3cret",
                    "--worker-token", "tok", "--no-split-special-tokens", "--max-inflight", "9",
                    "--balance-rel", "1.5", "--processes", "2", "--port", "0")
    assert _parse(env=config_env(config)) == config
