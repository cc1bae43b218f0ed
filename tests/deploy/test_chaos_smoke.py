"""benchmarks/chaos.py end to end, short: 10 s of load on a real stack (Redis, store, two
SmolLM2 CPU workers, router) with worker0 SIGKILLed and restarted. No greedy answer may differ
from the healthy stack's, no request may fail (streams cut after tokens were sent go on on the
other worker); every process is alive at the end."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos.py"


def test_chaos_smoke_worker_kill(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not on PATH: run `make test`, which installs it", pytrace=False)
    out = subprocess.run(
        [sys.executable, str(CHAOS), "--duration", "10", "--prompts", "2", "--concurrency", "4",
         "--faults", "worker0-kill", "--log-dir", str(tmp_path / "logs"),
         "--csv-dir", str(tmp_path / "csv")],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "csv" / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows
    assert [r for r in rows if r["status"] == "wrong"] == []
    # streams cut after their first tokens go on on the other worker (mid-stream migration)
    assert [r for r in rows if r["status"] == "failed"] == []
    assert sum(r["status"] == "ok" for r in rows) > 0
    assert "| every process alive at the end | True" in out.stdout
    with open(tmp_path / "csv" / "faults.csv") as f:
        assert [r["fault"] for r in csv.DictReader(f)] == ["worker0-kill"]
