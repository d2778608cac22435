"""The Prometheus endpoint, scraped while the real server runs: the histograms and counters move."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request

from shared.config import TelemetryConfig
from tests.e2e.conftest import generate, serve

_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? [-+0-9.eInf]+$')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        assert _LINE.match(line), f"not Prometheus text format: {line!r}"
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    want = {"model_name": "tiny", **labels}
    for key, v in samples.items():
        metric, _, rest = key.partition("{")
        got = dict(re.findall(r'([a-zA-Z_]+)="([^"]*)"', rest))
        if metric == name and got == want:
            return v
    return 0.0


async def test_prometheus_histograms_move() -> None:
    port = free_port()
    async with serve("tiny", telemetry=TelemetryConfig(metrics_port=port)) as served:
        before = await asyncio.to_thread(scrape, port)
        outs = await asyncio.gather(*(generate(served.stub, text=f"Hello {i}", max_tokens=5, ignore_eos=True,
                                               temperature=0.0) for i in range(3)))
        after = await asyncio.to_thread(scrape, port)
    assert all(o.final is not None and o.final.completion_tokens == 5 for o in outs)
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        name = f"duetserve:{hist}"
        assert value(before, f"{name}_count") == 0
        assert value(after, f"{name}_count") == 3, hist
        assert value(after, f"{name}_sum") > 0
        assert value(after, f"{name}_bucket", le="+Inf") == 3
    assert value(after, "duetserve:inter_token_latency_seconds_count") >= 3  # >= one gap per request
    assert value(after, "duetserve:generation_tokens_total") == 15
    assert value(after, "duetserve:prompt_tokens_total") == sum(o.final.prompt_tokens for o in outs)
    # prefix caching: every prompt token is looked up; "Hello <i>" prompts are shorter than a block
    assert value(after, "duetserve:prefix_cache_queries_total") == sum(o.final.prompt_tokens for o in outs)
    assert value(after, "duetserve:prefix_cache_hits_total") == 0
    assert value(after, "duetserve:request_success_total", finished_reason="length") == 3
    assert value(after, "duetserve:num_requests_running") == 0
    assert value(after, "duetserve:num_requests_waiting") == 0
    assert f'duetserve:kv_cache_usage_perc{{model_name="tiny"}}' in after
    assert value(after, "duetserve:sm_split_prefill") == value(after, "duetserve:sm_split_decode") == 0
    # the scheduler's prediction of each step, scored against the measured step (the CPU sends a profile)
    assert 'duetserve:predictor_abs_pct_error{model_name="tiny"}' in after


async def test_prefix_cache_counters_count_the_reused_prompt_tokens() -> None:
    port = free_port()
    prompt = list(range(20, 60))  # 40 tokens: 2 full blocks of 16 are reused by the second request
    async with serve("tiny", telemetry=TelemetryConfig(metrics_port=port)) as served:
        for _ in range(2):
            out = await generate(served.stub, token_ids={"ids": prompt}, max_tokens=2, temperature=0.0)
        after = await asyncio.to_thread(scrape, port)
    assert out.final is not None and out.final.cached_tokens == 32
    assert value(after, "duetserve:prefix_cache_queries_total") == 80
    assert value(after, "duetserve:prefix_cache_hits_total") == 32
