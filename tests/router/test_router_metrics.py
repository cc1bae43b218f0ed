"""RouterMetrics over prometheus_client: the exported names and labels, one registry per router
in a process, and values merged across router processes in multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from prometheus_client import multiprocess

from kvmesh.router.metrics import RouterMetrics


def _samples(text: bytes) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.decode().splitlines() if line and not line.startswith("#")}


def test_names_labels_and_values_in_the_text_format():
    metrics = RouterMetrics()
    metrics.errors.inc(status="400")
    metrics.errors.inc(status="400")
    metrics.decisions.inc(reason="prefix", worker="w0")
    metrics.prefix_hits.inc(32, tier="store")
    metrics.requests_running.set(5, worker="w0")
    metrics.ttft.observe(0.03)
    metrics.pd_transfer_bytes.inc(4096)
    samples = _samples(metrics.render())
    assert samples['kvmesh:http_errors_total{status="400"}'] == 2.0
    assert samples['kvmesh:routing_decisions_total{reason="prefix",worker="w0"}'] == 1.0
    assert samples['kvmesh:prefix_cache_hits_total{tier="store"}'] == 32.0
    assert samples['kvmesh:num_requests_running{worker="w0"}'] == 5.0
    assert samples['kvmesh:time_to_first_token_seconds_bucket{le="0.02"}'] == 0.0
    assert samples['kvmesh:time_to_first_token_seconds_bucket{le="0.05"}'] == 1.0
    assert samples["kvmesh:time_to_first_token_seconds_count"] == 1.0
    assert samples["kvmesh:pd_transfer_bytes_total"] == 4096.0
    assert samples["kvmesh:pd_requests_total"] == 0.0
    assert not any(name.endswith("_created") for name in samples)
    assert metrics.errors.get(status="400") == 2.0 and metrics.errors.get(status="500") == 0.0
    assert metrics.errors.samples() == {(("status", "400"),): 2.0}


def test_two_routers_in_one_process_keep_their_own_values():
    first, second = RouterMetrics(), RouterMetrics()
    first.client_disconnects.inc()
    first.worker_healthy.set(1, worker="w0")
    assert (first.client_disconnects.get(), second.client_disconnects.get()) == (1.0, 0.0)
    assert second.worker_healthy.samples() == {}
    assert "kvmesh:client_disconnects_total 0.0" in second.render().decode()


def test_observe_many_equals_observing_each():
    values = [0.0005, 0.001, 0.003, 0.0025, 0.7, 3.0, 1e-9, 2.5]  # on a bound, past the last
    one_by_one, in_bulk = RouterMetrics(), RouterMetrics()
    for value in values:
        one_by_one.itl.observe(value)
    in_bulk.itl.observe_many(values[:3])
    in_bulk.itl.observe_many(values[3:])
    in_bulk.itl.observe_many([])
    itl = "kvmesh:inter_token_latency_seconds"
    expected = {k: v for k, v in _samples(one_by_one.render()).items() if k.startswith(itl)}
    assert {k: v for k, v in _samples(in_bulk.render()).items() if k.startswith(itl)} == expected
    assert expected[itl + "_count"] == 8.0 and expected[itl + '_bucket{le="0.001"}'] == 3.0


_RECORD = textwrap.dedent("""
    import sys
    from kvmesh.router.metrics import RouterMetrics
    metrics = RouterMetrics()
    metrics.generation_tokens.inc(int(sys.argv[1]))
    metrics.router_inflight.set(int(sys.argv[1]))
    metrics.requests_running.set(int(sys.argv[1]), worker="w0")
    metrics.itl.observe(0.004)
""")


def test_multiprocess_mode_merges_every_router_process(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    pids = []
    for amount in ("3", "5"):
        proc = subprocess.Popen([sys.executable, "-P", "-c", _RECORD, amount], env=env)
        assert proc.wait(60) == 0
        pids.append(proc.pid)

    def scrape() -> dict[str, float]:
        render = ("from kvmesh.router.metrics import RouterMetrics\n"
                  "import sys; sys.stdout.buffer.write(RouterMetrics().render())")
        return _samples(subprocess.run([sys.executable, "-P", "-c", render], env=env,
                                       check=True, capture_output=True).stdout)

    samples = scrape()
    assert samples["kvmesh:generation_tokens_total"] == 8.0  # summed over processes
    assert samples['kvmesh:inter_token_latency_seconds_bucket{le="0.005"}'] == 2.0
    assert samples['kvmesh:num_requests_running{worker="w0"}'] == 5.0  # the latest poll
    assert samples["kvmesh:router_requests_inflight"] == 8.0  # live processes summed
    multiprocess.mark_process_dead(pids[0], str(tmp_path))
    samples = scrape()
    assert samples["kvmesh:router_requests_inflight"] == 5.0  # the dead one's share dropped
    assert samples["kvmesh:generation_tokens_total"] == 8.0  # counters keep what was counted
