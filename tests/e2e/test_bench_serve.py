"""`duetserve bench serve` against the simulated data plane: every request accounted for, and every
aggregate metric recomputed here from the per-request arrays."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from controlplane import bench_serve
from controlplane.bench_serve import Goodput, add_bench_flags, arrivals, bench, per_request, random_workload
from controlplane.launcher import spawn_sim_dataplane, stop_process
from controlplane.replay import RequestRecord, TraceRequest
from controlplane.server import ControlPlane
from shared.config import SchedulerConfig, ServerConfig

ROOT = Path(__file__).resolve().parents[2]
CODE_TRACE = ROOT / "tests/data/traces/azure_llm_2023_code_300.csv"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_flags(p)
    return p.parse_args(argv)


@contextlib.asynccontextmanager
async def sim_server(time_scale: float, **scheduler: object) -> AsyncIterator[ControlPlane]:
    """A control plane over a simulated H100 data plane (Qwen3-8B shapes); both stopped after."""
    workdir = tempfile.mkdtemp(prefix="ds-b-")
    endpoint = f"ipc://{workdir}/dp.sock"
    child = spawn_sim_dataplane(endpoint, model="qwen3-8b", gpu="h100", time_scale=time_scale)
    plane = ControlPlane(ServerConfig(port=0, dataplane_endpoint=endpoint, handshake_timeout_s=60.0,
                                      scheduler=SchedulerConfig(**scheduler)), "qwen3-8b")  # type: ignore[arg-type]
    try:
        await plane.start()
        yield plane
    finally:
        await plane.stop()
        stop_process(child)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("dataset", ["trace", "random"])
async def test_bench_accounts_for_every_request_and_metrics_recompute(dataset: str, tmp_path: Path) -> None:
    async with sim_server(0.05, policy="duet") as plane:
        argv = ["--address", f"127.0.0.1:{plane.port}", "--dataset", dataset, "--num-prompts", "30",
                "--request-rate", "40", "--goodput", "ttft:2000", "tpot:50", "--no-progress",
                "--random-input-len", "300", "--random-output-len", "20", "--random-range-ratio", "0.5"]
        if dataset == "trace":
            argv += ["--trace", str(CODE_TRACE), "--arrival", "trace"]
        else:  # percentiles of one's own choosing, named as vLLM names them
            argv += ["--metric-percentiles", "50,99,99.9"]
        result = await bench(parse(argv))
        assert plane.engine.scheduler is not None and plane.engine.scheduler.allocator.num_used == 0
    n = 30
    assert result["request_rate"] == 40.0
    assert result["completed"] + result["failed"] == n and result["failed"] == 0
    assert len(result["ttfts"]) == len(result["latencies"]) == len(result["itls"]) == n
    # a gap per streamed message after the first (as vLLM's client): at most one per token after the first
    assert all(1 <= len(g) + 1 <= o for g, o in zip(result["itls"], result["output_lens"]))
    assert result["total_output_tokens"] == sum(result["output_lens"])
    ttft = [t * 1e3 for t in result["ttfts"]]
    assert result["mean_ttft_ms"] == pytest.approx(statistics.fmean(ttft))
    assert result["median_ttft_ms"] == pytest.approx(statistics.median(ttft))
    assert result["p99_ttft_ms"] == pytest.approx(float(np.percentile(ttft, 99)))
    if dataset == "random":
        assert result["p99.9_ttft_ms"] == pytest.approx(float(np.percentile(ttft, 99.9)))
        assert "p90_ttft_ms" not in result and "p99.9_e2el_ms" in result
    else:
        assert result["p90_ttft_ms"] == pytest.approx(float(np.percentile(ttft, 90)))
    tpot = [(lat - t) * 1e3 / (o - 1) for lat, t, o in zip(result["latencies"], result["ttfts"], result["output_lens"])
            if o > 1]
    assert result["mean_tpot_ms"] == pytest.approx(statistics.fmean(tpot))
    itl = [g * 1e3 for gaps in result["itls"] for g in gaps]
    assert result["mean_itl_ms"] == pytest.approx(statistics.fmean(itl))
    assert result["output_throughput"] == pytest.approx(sum(result["output_lens"]) / result["duration"])
    good = sum(t <= 2000 and p <= 50 for t, p in zip(ttft, [(lat - t0) * 1e3 / (o - 1) if o > 1 else 0.0 for lat, t0, o in
                                                             zip(result["latencies"], result["ttfts"], result["output_lens"])]))
    assert result["request_goodput"] == pytest.approx(good / result["duration"])


@pytest.mark.parametrize("kind", ["regex", "json", "choice"])
async def test_a_share_of_structured_requests_is_sent_checked_and_reported(kind: str) -> None:
    async with sim_server(0.02) as plane:
        argv = ["--address", f"127.0.0.1:{plane.port}", "--dataset", "random", "--num-prompts", "24",
                "--request-rate", "80", "--no-progress", "--random-input-len", "64",
                "--random-output-len", "200" if kind == "json" else "24",  # room for an object to close
                "--structured-output-ratio", "0.5", "--structured-output", kind, "--seed", "3"]
        result = await bench(parse(argv))
        assert plane.engine.scheduler is not None and plane.engine.scheduler.allocator.num_used == 0
    kinds, valid = result["structured"], result["structured_follows"]
    picks = __import__("random").Random(3 + 2)
    assert kinds == [kind if picks.random() < 0.5 else "" for _ in range(24)]  # the seed's draw
    assert result["structured_requests"] == sum(map(bool, kinds)) and 0 < result["structured_requests"] < 24
    assert result["failed"] == 0 and result["structured_completed"] == result["structured_requests"]
    # the simulated model keeps to the masks (its tokens a hash): every structured text follows its grammar
    assert all(v is True for k, v in zip(kinds, valid) if k) and all(v is None for k, v in zip(kinds, valid) if not k)
    assert result["structured_correct"] == result["structured_requests"] and result["structured_correct_rate"] == 1.0
    lens = [o for k, o in zip(kinds, result["output_lens"]) if k]
    if kind == "regex":  # runs to its length, as an unstructured request does
        assert all(o == 24 for o in lens)
    if kind == "choice":
        assert all(o <= 5 for o in lens)  # ended by the grammar (a byte a token: "maybe" is 5)
    cut = [o for k, o in zip(kinds, result["output_lens"]) if k and o == 200]  # json: cut at its length
    assert result["structured_truncated"] == (len(cut) if kind == "json" else 0)
    free = [(lat - t) * 1e3 / (o - 1) for k, lat, t, o in zip(kinds, result["latencies"], result["ttfts"],
                                                            result["output_lens"]) if not k and o > 1]
    assert result["mean_tpot_ms_unstructured"] == pytest.approx(statistics.fmean(free))
    assert "structured_requests" in bench_serve.format_result(result)


def test_bench_serve_follows_checks_each_kind() -> None:
    from controlplane.bench_serve import follows

    assert follows("regex", "ab cd", "length") and not follows("regex", "ab1", "length")
    assert follows("json", '{"items":["a","bc"]}', "stop") and not follows("json", '{"items":["a"', "length")
    assert not follows("json", '{"items":[1]}', "stop") and not follows("json", '{"items":["a"],"x":1}', "stop")
    assert follows("choice", "maybe", "stop") and not follows("choice", "may", "length")
    assert not any(follows("json", text, "stop") for text in ("5", "null", "true", '"x"', "[" * 5000))


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
    assert arrivals(work, "poisson", 10.0, 0.25, seed=2) == bursty  # the flag alone sets the shape, as vLLM's
    for rate in (10.0, None, float("inf")):  # random lengths carry no timestamps, with a rate or without
        with pytest.raises(ValueError, match="arrival times that differ"):
            arrivals(work, "trace", rate, 1.0, seed=2)
    timed = [TraceRequest(t, 10, 5) for t in (0.0, 0.5, 2.0)]
    assert arrivals(timed, "trace", None, 1.0, 0) == [0.0, 0.5, 2.0]  # no rate: the trace's own times
    assert arrivals(timed, "trace", 2.0, 1.0, 0) == pytest.approx([0.0, 0.25, 1.0])  # its 1 req/s made 2


def test_percentiles_are_numpys_as_in_vllm() -> None:
    from controlplane.bench_serve import _stats

    stats = _stats("ttft", [float(v) for v in range(1, 11)])
    assert stats["p50_ttft_ms"] == stats["median_ttft_ms"] == 5.5
    assert stats["p90_ttft_ms"] == pytest.approx(9.1) and stats["p99_ttft_ms"] == pytest.approx(9.91)
    few = _stats("ttft", [1.0] * 58 + [2.0, 10.0])
    assert few["p99_ttft_ms"] == pytest.approx(float(np.percentile([1.0] * 58 + [2.0, 10.0], 99)))


def test_metric_percentiles_flag() -> None:
    """vLLM's --metric-percentiles: numbers in (0, 100], keys p50_ttft_ms / p99.9_ttft_ms; the summary
    printed lists those chosen."""
    from controlplane.bench_serve import compute_metrics, format_result

    assert parse(["--metric-percentiles", "50,99.9"]).metric_percentiles == (50.0, 99.9)
    assert parse([]).metric_percentiles == (50, 90, 99)
    for bad in ("0", "101", "50,x", ""):
        with pytest.raises(SystemExit):
            parse(["--metric-percentiles", bad])
    arrays = per_request([RequestRecord(0, 10, 3, sent=0.0, chunks=[(0.1, 1), (0.2, 1), (0.3, 1)],
                                        completion_tokens=3)])
    metrics = compute_metrics(arrays, 1.0, None, (50.0, 99.9))
    text = format_result({**metrics, "request_goodput": None})
    assert "p99.9_ttft_ms" in text and "p50_itl_ms" in text and "p99_ttft_ms" not in text


def test_inter_token_latency_is_one_gap_per_message() -> None:
    record = RequestRecord(0, 10, 6, sent=0.5, chunks=[(1.0, 1), (1.1, 1), (1.5, 4)], completion_tokens=6)
    arrays = per_request([record])
    assert arrays["itls"] == [[pytest.approx(0.1), pytest.approx(0.4)]]  # a 400 ms stall stays one gap
    assert arrays["ttfts"] == [0.5] and arrays["latencies"] == [1.0]


class _FakeStub:
    """Records, at each call, how many prompts had been built, and the timeout it was given."""

    def __init__(self, built: list[int]) -> None:
        self.built = built
        self.calls: list[tuple[int, float | None]] = []

    def Generate(self, request: object, timeout: float | None = None):  # noqa: N802, ANN201 - the stub's name
        self.calls.append((len(self.built), timeout))

        async def stream():  # noqa: ANN202
            yield SimpleNamespace(token_ids=[1], finish_reason="length", completion_tokens=1, cached_tokens=0)

        return stream()


async def test_every_prompt_is_built_before_the_clock_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []

    def prompt(rng: object, length: int, vocab: int) -> list[int]:
        built.append(length)
        return [20] * length

    monkeypatch.setattr(bench_serve, "make_prompt", prompt)
    stub = _FakeStub(built)
    work = random_workload(5, 100, 4, 1.0, seed=0)
    records, _ = await bench_serve.run_load(stub, work, [0.0, 0.0, 0.01, 0.02, 0.03],  # type: ignore[arg-type]
                                            vocab_size=100, max_model_len=1000, show_progress=False, timeout_s=7.0)
    assert [n for n, _ in stub.calls] == [len(built)] * 5 and len(built) == 6  # the shared prefix, then 5
    assert {t for _, t in stub.calls} == {7.0} and all(r.completion_tokens == 1 for r in records)


async def test_a_shared_random_prefix_is_served_from_the_prefix_cache() -> None:
    """--random-prefix-len (vLLM's flag): every prompt starts with the same tokens, and the server
    reports the prompt tokens its prefix cache served; requests after the first ones hit it."""
    async with sim_server(0.05) as plane:
        argv = ["--address", f"127.0.0.1:{plane.port}", "--dataset", "random", "--num-prompts", "12",
                "--request-rate", "20", "--no-progress", "--random-input-len", "50", "--random-output-len", "4",
                "--random-prefix-len", "256"]
        result = await bench(parse(argv))
        warm = await bench(parse(argv))  # the same prompts again: the first one hits too
        cold = await bench(parse([*argv, "--reset-prefix-cache"]))  # emptied first: the first one misses
    assert warm["cached_lens"][0] >= 256 and warm["prefix_cache_blocks_dropped"] is None
    assert cold["cached_lens"][0] == 0 and cold["prefix_cache_blocks_dropped"] >= 16
    assert result["completed"] == 12 and all(n >= 256 + 50 for n in result["input_lens"])
    hits = result["cached_lens"]
    assert hits[0] == 0 and sum(h == 256 for h in hits) >= 8  # 16 blocks of 16 tokens, once the first is cached
    assert result["total_cached_tokens"] == sum(hits)


async def test_requests_past_the_timeout_count_as_failed_and_free_their_kv() -> None:
    """--request-timeout: a stream still running at its deadline fails (DEADLINE_EXCEEDED), is counted
    as failed, and the server drops it (no KV block held after)."""
    async with sim_server(1.0) as plane:
        argv = ["--address", f"127.0.0.1:{plane.port}", "--dataset", "random", "--num-prompts", "4",
                "--no-progress", "--random-input-len", "64", "--random-output-len", "2000", "--request-timeout", "0.5"]
        result = await bench(parse(argv))
        assert result["request_rate"] == "inf"  # no rate: all at once, written as vLLM writes it (strict JSON)
        for _ in range(100):  # the aborts reach the scheduler after the client gave up
            if plane.engine.scheduler is not None and plane.engine.scheduler.allocator.num_used == 0:
                break
            await asyncio.sleep(0.05)
        assert plane.engine.scheduler is not None and plane.engine.scheduler.allocator.num_used == 0
    assert result["completed"] == 0 and result["failed"] == 4
    assert all(e.startswith("DEADLINE_EXCEEDED") for e in result["errors"])
    assert result["duration"] < 5.0
