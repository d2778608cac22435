"""`duetserve bench serve` against the simulated data plane: every request accounted for, and every
aggregate metric recomputed here from the per-request arrays."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import pytest

from controlplane.bench_serve import Goodput, add_bench_flags, arrivals, bench, random_workload
from controlplane.launcher import spawn_sim_dataplane, stop_process
from controlplane.server import ControlPlane
from shared.config import SchedulerConfig, ServerConfig

ROOT = Path(__file__).resolve().parents[2]
CODE_TRACE = ROOT / "tests/data/traces/azure_llm_2023_code_300.csv"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_flags(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("dataset", ["trace", "random"])
async def test_bench_accounts_for_every_request_and_metrics_recompute(dataset: str, tmp_path: Path) -> None:
    workdir = tempfile.mkdtemp(prefix="ds-b-")
    endpoint = f"ipc://{workdir}/dp.sock"
    child = spawn_sim_dataplane(endpoint, model="qwen3-8b", gpu="h100", time_scale=0.05)
    plane = ControlPlane(ServerConfig(port=0, dataplane_endpoint=endpoint, handshake_timeout_s=60.0,
                                      scheduler=SchedulerConfig(policy="duet")), "qwen3-8b")
    try:
        await plane.start()
        argv = ["--address", f"127.0.0.1:{plane.port}", "--dataset", dataset, "--num-prompts", "30",
                "--request-rate", "40", "--goodput", "ttft:2000", "tpot:50", "--no-progress",
                "--random-input-len", "300", "--random-output-len", "20", "--random-range-ratio", "0.5"]
        if dataset == "trace":
            argv += ["--trace", str(CODE_TRACE), "--arrival", "trace"]
        result = await bench(parse(argv))
        assert plane.engine.scheduler is not None and plane.engine.scheduler.allocator.num_used == 0
    finally:
        await plane.stop()
        stop_process(child)
        shutil.rmtree(workdir, ignore_errors=True)
    n = 30
    assert result["completed"] + result["failed"] == n and result["failed"] == 0
    assert len(result["ttfts"]) == len(result["latencies"]) == len(result["itls"]) == n
    assert result["output_lens"] == [len(g) + 1 for g in result["itls"]]  # every token's gap counted
    assert result["total_output_tokens"] == sum(result["output_lens"])
    ttft = [t * 1e3 for t in result["ttfts"]]
    assert result["mean_ttft_ms"] == pytest.approx(statistics.fmean(ttft))
    assert result["median_ttft_ms"] == pytest.approx(statistics.median(ttft))
    tpot = [(lat - t) * 1e3 / (o - 1) for lat, t, o in zip(result["latencies"], result["ttfts"], result["output_lens"])
            if o > 1]
    assert result["mean_tpot_ms"] == pytest.approx(statistics.fmean(tpot))
    itl = [g * 1e3 for gaps in result["itls"] for g in gaps]
    assert result["mean_itl_ms"] == pytest.approx(statistics.fmean(itl))
    assert result["output_throughput"] == pytest.approx(sum(result["output_lens"]) / result["duration"])
    good = sum(t <= 2000 and p <= 50 for t, p in zip(ttft, [(lat - t0) * 1e3 / (o - 1) if o > 1 else 0.0 for lat, t0, o in
                                                             zip(result["latencies"], result["ttfts"], result["output_lens"])]))
    assert result["request_goodput"] == pytest.approx(good / result["duration"])


def test_arrival_processes() -> None:
    work = random_workload(2000, 100, 10, 1.0, seed=1)
    poisson = arrivals(work, "poisson", 10.0, 1.0, seed=2)
    gaps = [b - a for a, b in zip(poisson, poisson[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.1)
    bursty = arrivals(work, "gamma", 10.0, 0.25, seed=2)
    bgaps = [b - a for a, b in zip(bursty, bursty[1:])]
    assert statistics.fmean(bgaps) == pytest.approx(0.1, rel=0.15)
    assert statistics.pstdev(bgaps) > 1.5 * statistics.pstdev(gaps)  # gamma shape < 1 is burstier
    assert arrivals(work, "poisson", None, 1.0, 0) == [0.0] * len(work)
    with pytest.raises(ValueError):
        Goodput.parse(["latency:5"])


async def test_a_shared_random_prefix_is_served_from_the_prefix_cache() -> None:
    """--random-prefix-len (vLLM's flag): every prompt starts with the same tokens, and the server
    reports the prompt tokens its prefix cache served; requests after the first ones hit it."""
    workdir = tempfile.mkdtemp(prefix="ds-b-")
    endpoint = f"ipc://{workdir}/dp.sock"
    child = spawn_sim_dataplane(endpoint, model="qwen3-8b", gpu="h100", time_scale=0.05)
    plane = ControlPlane(ServerConfig(port=0, dataplane_endpoint=endpoint, handshake_timeout_s=60.0), "qwen3-8b")
    try:
        await plane.start()
        argv = ["--address", f"127.0.0.1:{plane.port}", "--dataset", "random", "--num-prompts", "12",
                "--request-rate", "20", "--no-progress", "--random-input-len", "50", "--random-output-len", "4",
                "--random-prefix-len", "256"]
        result = await bench(parse(argv))
        warm = await bench(parse(argv))  # the same prompts again: the first one hits too
        cold = await bench(parse([*argv, "--reset-prefix-cache"]))  # emptied first: the first one misses
    finally:
        await plane.stop()
        stop_process(child)
        shutil.rmtree(workdir, ignore_errors=True)
    assert warm["cached_lens"][0] >= 256 and warm["prefix_cache_blocks_dropped"] is None
    assert cold["cached_lens"][0] == 0 and cold["prefix_cache_blocks_dropped"] >= 16
    assert result["completed"] == 12 and all(n >= 256 + 50 for n in result["input_lens"])
    hits = result["cached_lens"]
    assert hits[0] == 0 and sum(h == 256 for h in hits) >= 8  # 16 blocks of 16 tokens, once the first is cached
    assert result["total_cached_tokens"] == sum(hits)
