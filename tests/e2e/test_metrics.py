"""The Prometheus endpoint, scraped while the real server runs: the histograms and counters move."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request

import grpc
import pytest

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from shared.config import TelemetryConfig
from tests.e2e.conftest import generate, serve
from tests.e2e.test_faults import end_of
from tests.e2e.test_limits import LONG, slow_steps, wait_for

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
    for hist in ("request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens"):
        name = f"duetserve:{hist}"  # vLLM's per-request histograms: one point per finished request
        assert f'{name}_count{{model_name="tiny"}}' in before and value(before, f"{name}_count") == 0, hist
        assert value(after, f"{name}_count") == 3, hist
    assert value(after, "duetserve:request_generation_tokens_sum") == 15
    assert value(after, "duetserve:request_params_max_tokens_sum") == 15  # max_tokens 5, three times
    assert value(after, "duetserve:request_params_n_count") == 3
    assert value(after, "duetserve:request_params_n_bucket", le="1.0") == 3
    assert value(after, "duetserve:request_generation_tokens_bucket", le="5.0") == 3
    assert value(after, "duetserve:request_prompt_tokens_sum") == sum(o.final.prompt_tokens for o in outs)
    inference = value(after, "duetserve:request_inference_time_seconds_sum")
    parts = value(after, "duetserve:request_prefill_time_seconds_sum") + value(
        after, "duetserve:request_decode_time_seconds_sum")
    assert abs(inference - parts) < 1e-6 and 0 < parts <= value(after, "duetserve:e2e_request_latency_seconds_sum")
    assert value(after, "duetserve:generation_tokens_total") == 15
    assert value(after, "duetserve:prompt_tokens_total") == sum(o.final.prompt_tokens for o in outs)
    # prefix caching: every prompt token is looked up; "Hello <i>" prompts are shorter than a block
    assert value(after, "duetserve:prefix_cache_queries_total") == sum(o.final.prompt_tokens for o in outs)
    assert value(after, "duetserve:prefix_cache_hits_total") == 0
    assert value(after, "duetserve:request_success_total", finished_reason="length") == 3
    assert value(after, "duetserve:num_requests_running") == 0
    assert value(after, "duetserve:num_requests_waiting") == 0
    assert 'duetserve:kv_cache_usage_perc{model_name="tiny"}' in after
    assert value(after, "duetserve:sm_split_prefill") == value(after, "duetserve:sm_split_decode") == 0
    # the scheduler's prediction of each step, scored against the measured step (the CPU sends a profile)
    assert 'duetserve:predictor_abs_pct_error{model_name="tiny"}' in after


async def test_every_series_is_there_from_the_start_and_token_counters_move_while_streaming() -> None:
    """A fresh server exports every histogram (empty) and each finish reason's counter (0), as vLLM's;
    the token counters move as tokens stream, not when the request ends (a dashboard's rate of
    generation_tokens_total read 0 for as long as a long completion ran)."""
    port = free_port()
    async with serve("tiny", telemetry=TelemetryConfig(metrics_port=port)) as served:
        fresh = await asyncio.to_thread(scrape, port)
        slow_steps(served)
        call = served.stub.Generate(pb.GenerateRequest(request_id="long", **LONG))
        streamed = 0
        while streamed < 20:
            streamed += len((await call.read()).token_ids)
        mid = await asyncio.to_thread(scrape, port)
        await served.stub.Abort(pb.AbortRequest(request_id="long"))
        await end_of(call)
    tiny = '{model_name="tiny"}'
    for reason in ("stop", "length", "abort", "error"):
        assert fresh[f'duetserve:request_success_total{{finished_reason="{reason}",model_name="tiny"}}'] == 0
    for code in ("INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        assert fresh[f'duetserve:request_refused_total{{code="{code}",model_name="tiny"}}'] == 0
    for hist in ("request_params_n", "request_params_max_tokens"):
        assert fresh[f"duetserve:{hist}_count{tiny}"] == 0
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert fresh[f"duetserve:{hist}_count{tiny}"] == 0 and fresh[f"duetserve:{hist}_sum{tiny}"] == 0
        assert fresh[f'duetserve:{hist}_bucket{{model_name="tiny",le="+Inf"}}'] == 0
    assert fresh[f"duetserve:generation_tokens_total{tiny}"] == fresh[f"duetserve:prompt_tokens_total{tiny}"] == 0
    assert value(mid, "duetserve:generation_tokens_total") >= streamed  # the request is still running
    assert value(mid, "duetserve:prompt_tokens_total") == len(LONG["token_ids"]["ids"])  # type: ignore[index]
    assert value(mid, "duetserve:prefix_cache_queries_total") == len(LONG["token_ids"]["ids"])  # type: ignore[index]
    assert value(mid, "duetserve:e2e_request_latency_seconds_count") == 0
    assert value(mid, "duetserve:time_to_first_token_seconds_count") == 1


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


async def test_preemptions_are_counted_without_async_scheduling() -> None:
    """The scheduler preempts while planning a step: the counter catches them then, not only when an
    earlier step happens to be in flight."""
    port = free_port()
    async with serve("tiny", telemetry=TelemetryConfig(metrics_port=port), num_kv_blocks=8,
                     async_scheduling=False) as served:
        outs = await asyncio.gather(*(generate(served.stub, token_ids={"ids": list(range(3 + i, 23 + i))},
                                               max_tokens=60, ignore_eos=True, temperature=0.0) for i in range(4)))
        assert all(o.final is not None and o.final.completion_tokens == 60 for o in outs)
        preempted = served.scheduler.num_preemptions
        samples = await asyncio.to_thread(scrape, port)
    assert preempted > 0 and value(samples, "duetserve:num_preemptions_total") == preempted


async def test_prompt_tokens_count_only_requests_that_were_admitted() -> None:
    """Requests aborted while queued never had their prompt looked up or prefilled."""
    port = free_port()
    async with serve("tiny", max_num_seqs=1, telemetry=TelemetryConfig(metrics_port=port)) as served:
        slow_steps(served)
        running = served.stub.Generate(pb.GenerateRequest(request_id="run", **LONG))
        await running.read()
        queued = [served.stub.Generate(pb.GenerateRequest(request_id=f"q{i}", **LONG)) for i in range(3)]
        await wait_for(lambda: served.scheduler.num_waiting == 3)
        for i in range(3):
            await served.stub.Abort(pb.AbortRequest(request_id=f"q{i}"))
        await asyncio.gather(*(end_of(c) for c in queued))
        await wait_for(lambda: served.scheduler.num_waiting == 0)
        await asyncio.sleep(0.2)  # a few steps of "run": each refreshes the gauges
        busy = await asyncio.to_thread(scrape, port)
        await served.stub.Abort(pb.AbortRequest(request_id="run"))
        await end_of(running)
        await wait_for(lambda: not served.scheduler.seqs)
        await asyncio.sleep(0.2)
        samples = await asyncio.to_thread(scrape, port)
    prompt = len(LONG["token_ids"]["ids"])
    assert value(samples, "duetserve:prompt_tokens_total") == prompt
    assert value(samples, "duetserve:prefix_cache_queries_total") == prompt
    assert value(busy, "duetserve:num_requests_waiting") == 0
    assert value(samples, "duetserve:num_requests_running") == 0  # refreshed when the step loop went idle
    assert value(samples, "duetserve:kv_cache_usage_perc") == 0


async def test_the_later_completions_of_n_count_from_the_calls_arrival() -> None:
    """With n > 1, completion i's TTFT and latency are measured from when the call arrived (as vLLM's
    child requests), not from when it joined after completion 0's prompt."""
    port = free_port()
    async with serve("tiny", telemetry=TelemetryConfig(metrics_port=port)) as served:
        slow_steps(served, 0.2)
        start = asyncio.get_running_loop().time()
        first: dict[int, float] = {}
        async for response in served.stub.Generate(pb.GenerateRequest(
                token_ids={"ids": list(range(3, 43))}, n=2, max_tokens=3, ignore_eos=True, temperature=1.0)):
            if response.token_ids and response.index not in first:
                first[response.index] = asyncio.get_running_loop().time() - start
        samples = await asyncio.to_thread(scrape, port)
    assert value(samples, "duetserve:time_to_first_token_seconds_count") == 2
    assert value(samples, "duetserve:time_to_first_token_seconds_sum") >= 0.9 * sum(first.values())


async def test_served_model_name_names_the_model_to_clients_metrics_and_spans() -> None:
    """vLLM's --served-model-name: GetModelInfo, the model_name label and the span name say it, not the
    folder or preset the weights came from."""
    port = free_port()
    async with serve("tiny", telemetry=TelemetryConfig(metrics_port=port), served_model_name="team/llm") as served:
        info = await served.stub.GetModelInfo(pb.GetModelInfoRequest())
        await generate(served.stub, text="Hi", max_tokens=2, ignore_eos=True)
        samples = await asyncio.to_thread(scrape, port)
        span_model = served.plane.observer.model
    assert info.model == "team/llm" and span_model == "team/llm"
    labelled = [key for key in samples if "model_name=" in key]
    assert labelled and all('model_name="team/llm"' in key for key in labelled)


async def test_refused_calls_are_counted_by_code_and_n_once_per_call() -> None:
    """A call refused for a bad argument or a duplicate id counts in request_refused_total by its code (not
    as a finished request); a cancelled one does not; an n=3 call records n once and max_tokens for each
    of its completions."""
    port = free_port()
    async with serve("tiny", telemetry=TelemetryConfig(metrics_port=port)) as served:
        for fields in ({"text": "hi", "max_tokens": 4, "temperature": -1.0}, {"text": ""}):
            try:
                await generate(served.stub, **fields)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            else:
                raise AssertionError(f"{fields} was accepted")
        slow_steps(served)
        call = served.stub.Generate(pb.GenerateRequest(request_id="dup", **LONG))
        await call.read()
        try:
            await generate(served.stub, request_id="dup", text="again", max_tokens=2)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
        else:
            raise AssertionError("a duplicate id was accepted")
        call.cancel()
        await generate(served.stub, text="three", n=3, max_tokens=3, ignore_eos=True)
        await wait_for(lambda: value(scrape(port), "duetserve:request_success_total", finished_reason="abort") == 1)
        after = await asyncio.to_thread(scrape, port)
    assert value(after, "duetserve:request_refused_total", code="INVALID_ARGUMENT") == 2
    assert value(after, "duetserve:request_refused_total", code="ALREADY_EXISTS") == 1
    assert sum(v for k, v in after.items() if k.startswith("duetserve:request_refused_total")) == 3
    assert value(after, "duetserve:request_success_total", finished_reason="error") == 0
    assert value(after, "duetserve:request_params_n_count") == 2  # the cancelled call and the n=3 one
    assert value(after, "duetserve:request_params_n_bucket", le="2.0") == 1
    # every finished completion: the cancelled one (3000) and the n=3 call's three (3 each)
    assert value(after, "duetserve:request_params_max_tokens_count") == 4
    assert value(after, "duetserve:request_params_max_tokens_sum") == 3009


async def test_request_params_max_tokens_is_the_effective_max_tokens() -> None:
    """As vLLM's OpenAI server records it: the default when unset (16, its completions API's), and at most
    the room the prompt leaves (a max_tokens past it counts as that room, not as asked)."""
    port = free_port()
    async with serve("tiny", max_model_len=64, telemetry=TelemetryConfig(metrics_port=port)) as served:
        prompt = list(range(3, 43))  # 40 tokens: 24 left under max_model_len 64
        past = await generate(served.stub, token_ids={"ids": prompt}, max_tokens=1_000_000, ignore_eos=True)
        unset = await generate(served.stub, token_ids={"ids": prompt}, ignore_eos=True)
        assert len(past.token_ids) == 24 and len(unset.token_ids) == 16
        await wait_for(lambda: value(scrape(port), "duetserve:request_params_max_tokens_count") == 2)
        after = await asyncio.to_thread(scrape, port)
    assert value(after, "duetserve:request_params_max_tokens_sum") == 24 + 16


async def refused_both_ways(served, code) -> None:  # noqa: ANN001
    """An n=1 and an n=2 call are both refused with `code`."""
    for n in (1, 2):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, token_ids={"ids": [5, 6]}, max_tokens=2, n=n)
        assert err.value.code() == code, n


async def test_calls_the_engine_refuses_after_validation_do_not_count_as_accepted() -> None:
    """A call refused at admission (a full queue, or a data plane lost after validation) counts in
    request_refused_total, not in request_params_n, whether one completion or all n of it were refused."""
    from controlplane.engine import EngineUnavailable
    from tests.e2e.test_limits import all_blocks_free

    port = free_port()
    async with serve("tiny", max_num_seqs=1, max_queued_requests=2,
                     telemetry=TelemetryConfig(metrics_port=port)) as served:
        slow_steps(served)
        calls = [served.stub.Generate(pb.GenerateRequest(request_id="r0", **LONG))]
        await calls[0].read()  # running: it holds the only sequence slot (the others queue behind it)
        calls += [served.stub.Generate(pb.GenerateRequest(request_id=f"r{i}", **LONG)) for i in (1, 2)]
        await wait_for(lambda: served.scheduler.num_waiting == 2)
        await refused_both_ways(served, grpc.StatusCode.RESOURCE_EXHAUSTED)  # a full queue
        for call in calls:
            call.cancel()
        await wait_for(lambda: all_blocks_free(served))
        add = served.plane.engine.add_request

        def gone(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the data plane lost after validation
            raise EngineUnavailable("the data plane is gone")

        served.plane.engine.add_request = gone  # type: ignore[method-assign]
        await refused_both_ways(served, grpc.StatusCode.UNAVAILABLE)
        served.plane.engine.add_request = add  # type: ignore[method-assign]
        after = await asyncio.to_thread(scrape, port)
    assert value(after, "duetserve:request_refused_total", code="RESOURCE_EXHAUSTED") == 2
    assert value(after, "duetserve:request_refused_total", code="UNAVAILABLE") == 2
    assert value(after, "duetserve:request_params_n_count") == 3  # the three running or queued calls only
