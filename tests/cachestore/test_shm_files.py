"""Segment files in /dev/shm: a file whose creator died (however it died) is swept by the next
process that creates one; a file whose creator lives, or one just made, is kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kvmesh.cachestore.shm import segments

KILLED = textwrap.dedent("""
    import os, signal, sys
    from kvmesh.cachestore.shm import segments
    segment = segments.create_segment(1 << 20, sys.argv[1])
    print(segment.name, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
""")


def test_segments_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    proc = subprocess.run([sys.executable, "-P", "-c", KILLED, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = proc.stdout.split()[0]
    live = segments.create_segment(1 << 20, str(tmp_path))
    names = set(os.listdir(tmp_path))
    assert {dead, live.name} <= names
    assert segments.sweep_stale(str(tmp_path), older_than_s=3600) == 0  # too young to be judged
    assert segments.sweep_stale(str(tmp_path), older_than_s=0) == 1
    assert set(os.listdir(tmp_path)) == names - {dead}
    (tmp_path / "not-a-segment").write_bytes(b"x")
    assert segments.sweep_stale(str(tmp_path), older_than_s=0) == 0
    live.close()
    assert live.name not in os.listdir(tmp_path)


def test_an_arena_file_goes_with_its_lock(tmp_path):
    """A removed arena file drops its lock and fd; its mapping stays usable until unmapped."""
    segment = segments.create_segment(1 << 20, str(tmp_path))
    segment.mm[:3] = b"abc"
    fd = segment._fd
    segment.remove_file()
    assert not os.listdir(tmp_path)
    assert segment._fd is None
    with pytest.raises(OSError):  # closed
        os.fstat(fd)
    assert segment.mm[:3] == b"abc"
    segment.close()  # idempotent about the file
