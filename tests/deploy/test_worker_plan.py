"""The workers a launcher starts (deploy/worker_plan.py): roles, names, router flags, GPUs."""

from __future__ import annotations

import pytest

from kvmesh.deploy.errors import InvalidWorkerCounts
from kvmesh.deploy.worker_plan import (
    cuda_devices,
    role_argv,
    router_worker_argv,
    worker_names,
    worker_roles,
)


def test_colocated_by_default_and_disaggregated_when_asked():
    assert worker_roles(None, 0, 0) == ["both"]
    assert worker_roles(None, 0, 0, default_workers=4) == ["both"] * 4  # e.g. one per GPU
    assert worker_roles(2, 0, 0, default_workers=4) == ["both"] * 2
    roles = worker_roles(None, 2, 1)
    assert roles == ["prefill", "prefill", "decode"]
    assert worker_names(roles) == ["prefill worker 0", "prefill worker 1", "decode worker 0"]
    assert worker_names(["both", "both"]) == ["worker 0", "worker 1"]
    assert [role_argv(r) for r in ("both", "prefill")] == [[], ["--role", "prefill"]]
    assert router_worker_argv(roles, ["a:1", "b:2", "c:3"]) == [
        "--prefill-worker", "a:1", "--prefill-worker", "b:2", "--decode-worker", "c:3"]
    assert router_worker_argv(["both"], ["a:1"]) == ["--worker", "a:1"]


@pytest.mark.parametrize("counts, message", [
    ((0, 0, 0), "--workers must be at least 1, got 0"),
    ((1, 1, 1), "exclude each other"),
    ((None, 1, 0), "go together"),
    ((None, 0, 2), "go together"),
    ((None, -1, 1), ">= 0"),
])
def test_counts_that_do_not_go_together_are_refused(counts, message):
    with pytest.raises(InvalidWorkerCounts, match=message):
        worker_roles(*counts)


def test_gpus_are_taken_in_turn_and_shared_ones_split_the_memory():
    # one GPU, a prefill and a decode worker: both on cuda:0, each half of 0.9
    assert cuda_devices(2, 1) == [(0, 0.45), (0, 0.45)]
    assert cuda_devices(2, 2) == [(0, None), (1, None)]
    # three workers on two GPUs: cuda:0 is shared by two, cuda:1 is the third's alone
    assert cuda_devices(3, 2) == [(0, 0.45), (1, None), (0, 0.45)]
    assert cuda_devices(3, 1) == [(0, 0.3), (0, 0.3), (0, 0.3)]
