"""`duetserve bench serve`: an open-loop load generator over the public gRPC API with the metrics
vLLM's `bench serve` reports (same JSON keys where they exist).

Arrivals: the trace's own timestamps scaled to a target rate, or Poisson / gamma (burstiness) at a
rate. Workloads: an Azure-style trace CSV (prompt and output lengths; prompts are random token ids,
EOS ignored) or random lengths; a fraction of the requests may carry a structured output (as vLLM's
structured-output benchmark), each checked against it. It is a client: it speaks only protos/ and
decides nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from controlplane.flag_types import checked
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
from controlplane.replay import RequestRecord, TraceRequest, load_trace, make_prompt

PERCENTILES = (50, 90, 99)
STRUCTURED_KINDS = ("regex", "json", "choice")
BENCH_CHOICES = ("yes", "no", "maybe")
BENCH_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"],
                "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 16}}}}
REQUEST_TIMEOUT_S = 6 * 3600.0  # a stream longer than this fails (vLLM's benchmark client: 6 h as well)


@dataclass(frozen=True)
class Goodput:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: list[str] | None) -> Goodput | None:
        if not items:
            return None
        values: dict[str, float] = {}
        for item in items:
            name, _, ms = item.partition(":")
            if name not in ("ttft", "tpot", "e2el") or not ms:
                raise ValueError(f"--goodput takes ttft:MS tpot:MS e2el:MS, got {item!r}")
            values[f"{name}_ms"] = float(ms)
        return cls(**values)


def arrivals(workload: list[TraceRequest], mode: str, rate: float | None, burstiness: float, seed: int) -> list[float]:
    """Send times (s): the trace's own gaps, scaled to `rate` when there is one, or Poisson/gamma gaps at
    `rate`, all at once without one (gamma: shape `burstiness`, mean 1/rate, as vLLM's; Poisson is shape 1,
    and a burstiness other than 1 makes poisson gamma, as in vLLM, where the flag alone sets the shape)."""
    rate = None if rate == float("inf") else rate
    if mode == "trace":
        span = workload[-1].arrival_s - workload[0].arrival_s
        if span <= 0 and len(workload) > 1:
            raise ValueError("--arrival trace needs arrival times that differ (a trace's timestamps; the random "
                             "dataset has none): use --arrival poisson or gamma")
        start = workload[0].arrival_s
        scale = 1.0 if rate is None or span <= 0 else (len(workload) - 1) / span / rate
        return [(r.arrival_s - start) * scale for r in workload]
    if rate is None:
        return [0.0] * len(workload)
    rng = random.Random(seed)
    shape = burstiness  # gamma with shape k and mean 1/rate; k = 1 is Poisson
    t, out = 0.0, []
    for _ in workload:
        out.append(t)
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
    return out


def random_workload(n: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                    prefix_len: int = 0) -> list[TraceRequest]:
    """`n` requests of random lengths; each prompt is `prefix_len` shared tokens plus its own part."""
    rng = random.Random(seed)
    lo_in, lo_out = max(1, int(input_len * range_ratio)), max(1, int(output_len * range_ratio))
    return [TraceRequest(0.0, prefix_len + rng.randint(lo_in, input_len), rng.randint(lo_out, output_len))
            for _ in range(n)]


def structured_output(kind: str, max_tokens: int) -> pb.StructuredOutputs:
    """A benchmark request's structured output: `regex` lowercase words longer than `max_tokens` tokens can
    spell (64 characters a token, more than any vocabulary's tokens hold; so it runs to its length, as an
    unstructured one does, and costs only its masks); `json` an object listing strings (it ends when the
    model closes it); `choice` one of three words."""
    if kind == "regex":
        return pb.StructuredOutputs(regex=f"[a-z ]{{{64 * max_tokens}}}")
    if kind == "json":
        return pb.StructuredOutputs(json=json.dumps(BENCH_SCHEMA), disable_any_whitespace=True)
    return pb.StructuredOutputs(choice=list(BENCH_CHOICES))


def follows(kind: str, text: str, finish_reason: str) -> bool:
    """Whether a completed structured request's text is what it asked for (a regex one may stop at its
    length: any prefix of the language; a JSON one must be whole)."""
    if kind == "regex":
        return re.fullmatch(r"[a-z ]*", text) is not None
    if kind == "json":
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return False
        if not isinstance(value, dict):
            return False
        items = value.get("items")
        return finish_reason == "stop" and set(value) == {"items"} and isinstance(items, list) and all(
            isinstance(i, str) and len(i) <= 16 for i in items)
    return text in BENCH_CHOICES


def _request(record: RequestRecord, prompt: list[int]) -> pb.GenerateRequest:
    # greedy and unpenalised, whatever defaults the model's generation config sets
    request = pb.GenerateRequest(max_tokens=record.max_tokens, temperature=0.0, repetition_penalty=1.0,
                                 ignore_eos=True, priority=record.priority)
    request.token_ids.ids.extend(prompt)
    if record.structured:
        request.structured_outputs.CopyFrom(structured_output(record.structured, record.max_tokens))
    return request


async def _one(stub: pb_grpc.GenerationStub, record: RequestRecord, request: pb.GenerateRequest, t0: float,
               progress: object | None, timeout_s: float) -> None:
    record.sent = time.monotonic() - t0
    try:
        async for response in stub.Generate(request, timeout=timeout_s):
            if response.token_ids:
                record.chunks.append((time.monotonic() - t0, len(response.token_ids)))
            if record.structured:
                record.text += response.text
            if response.finish_reason:
                record.finish_reason = response.finish_reason
                record.completion_tokens = response.completion_tokens
                record.cached_tokens = response.cached_tokens
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"
    if progress is not None:
        progress.update(1)  # type: ignore[attr-defined]


async def run_load(stub: pb_grpc.GenerationStub, workload: list[TraceRequest], send_times: list[float], *,
                   vocab_size: int, max_model_len: int, seed: int = 0, show_progress: bool = True,
                   max_concurrency: int | None = None, prefix_len: int = 0,
                   priorities: list[int] | None = None, timeout_s: float = REQUEST_TIMEOUT_S,
                   structured_ratio: float = 0.0, structured_kind: str = "regex",
                   ) -> tuple[list[RequestRecord], float]:
    """Send each request at its time (open loop); returns the records and the wall duration. Each
    prompt starts with the same `prefix_len` random tokens (as far as its length allows); request i
    carries `priorities[i]` when given (a server under --scheduling-policy priority); a `structured_ratio`
    of them, drawn with the seed, a `structured_kind` structured output. Every request is built before the
    clock starts (as vLLM's client does), and a stream past `timeout_s` fails."""
    rng = random.Random(seed)
    picks = random.Random(seed + 2)
    shared = make_prompt(random.Random(seed + 1), prefix_len, vocab_size)
    records, requests = [], []
    for i, req in enumerate(workload):
        max_tokens = max(1, min(req.output_tokens, max_model_len - 1))
        record = RequestRecord(i, max(1, min(req.prompt_tokens, max_model_len - max_tokens)), max_tokens,
                               priority=priorities[i] if priorities else 0,
                               structured=structured_kind if picks.random() < structured_ratio else "")
        records.append(record)
        head = shared[: record.prompt_tokens]
        requests.append(_request(record, head + make_prompt(rng, record.prompt_tokens - len(head), vocab_size)))
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(workload), unit="req", desc="requests")
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    tasks = []
    t0 = time.monotonic()

    async def send(record: RequestRecord, request: pb.GenerateRequest) -> None:
        if gate is None:
            return await _one(stub, record, request, t0, progress, timeout_s)
        async with gate:
            await _one(stub, record, request, t0, progress, timeout_s)

    for record, request, at in zip(records, requests, send_times):
        delay = at - (time.monotonic() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(record, request)))
    await asyncio.gather(*tasks)
    if progress is not None:
        progress.close()  # type: ignore[attr-defined]
    return records, time.monotonic() - t0


def percentile_key(p: float, name: str) -> str:
    """vLLM's key of a percentile: p99_ttft_ms, p99.9_ttft_ms."""
    return f"p{int(p) if float(p).is_integer() else p}_{name}_ms"


def parse_percentiles(text: str) -> tuple[float, ...]:
    """`--metric-percentiles` ("50,90,99.9"): each in (0, 100], as vLLM takes them."""
    try:
        values = tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--metric-percentiles takes numbers separated by commas, got {text!r}")
    if not values or any(not 0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"--metric-percentiles: each must be in (0, 100], got {text!r}")
    return values


def _stats(name: str, values_ms: list[float], percentiles: tuple[float, ...] = PERCENTILES) -> dict[str, float]:
    """Mean, median, standard deviation and percentiles as vLLM computes them (numpy's, linear)."""
    if not values_ms:
        values_ms = [0.0]
    out = {f"mean_{name}_ms": statistics.fmean(values_ms), f"median_{name}_ms": statistics.median(values_ms),
           f"std_{name}_ms": statistics.pstdev(values_ms)}
    for p, value in zip(percentiles, np.percentile(values_ms, percentiles)):
        out[percentile_key(p, name)] = float(value)
    return out


def per_request(records: list[RequestRecord]) -> dict[str, list]:
    """vLLM's per-request arrays (seconds), from which every aggregate below is computed."""
    ttfts, latencies, itls = [], [], []
    for r in records:
        ok = bool(r.chunks) and not r.error
        ttfts.append(r.chunks[0][0] - r.sent if ok else 0.0)
        latencies.append(r.chunks[-1][0] - r.sent if ok else 0.0)
        # one gap per streamed message after the first, whatever tokens it carries (as vLLM's client)
        itls.append([now - prev for (prev, _), (now, _) in zip(r.chunks, r.chunks[1:])])
    arrays = {"input_lens": [r.prompt_tokens for r in records], "output_lens": [r.completion_tokens for r in records],
              "ttfts": ttfts, "itls": itls, "latencies": latencies, "start_times": [r.sent for r in records],
              "errors": [r.error for r in records], "cached_lens": [r.cached_tokens for r in records]}
    if any(r.structured for r in records):  # which carried a structured output, and whether its text follows it
        arrays["structured"] = [r.structured for r in records]
        arrays["finish_reasons"] = [r.finish_reason for r in records]
        arrays["structured_follows"] = [follows(r.structured, r.text, r.finish_reason) if r.structured and not r.error
                                      else None for r in records]
    return arrays


def compute_metrics(arrays: dict[str, list], duration_s: float, goodput: Goodput | None,
                    percentiles: tuple[float, ...] = PERCENTILES) -> dict[str, object]:
    ok = [i for i, e in enumerate(arrays["errors"]) if not e and arrays["output_lens"][i] > 0]
    out_lens = [arrays["output_lens"][i] for i in ok]
    ttft = [arrays["ttfts"][i] * 1e3 for i in ok]
    e2el = [arrays["latencies"][i] * 1e3 for i in ok]
    tpot = [(arrays["latencies"][i] - arrays["ttfts"][i]) * 1e3 / (arrays["output_lens"][i] - 1)
            for i in ok if arrays["output_lens"][i] > 1]
    itl = [g * 1e3 for i in ok for g in arrays["itls"][i]]
    good = len(ok)
    if goodput is not None:
        good = 0
        for i in ok:
            n = arrays["output_lens"][i]
            t = arrays["ttfts"][i] * 1e3
            p = (arrays["latencies"][i] - arrays["ttfts"][i]) * 1e3 / (n - 1) if n > 1 else 0.0
            good += ((goodput.ttft_ms is None or t <= goodput.ttft_ms) and (goodput.tpot_ms is None or p <= goodput.tpot_ms)
                     and (goodput.e2el_ms is None or arrays["latencies"][i] * 1e3 <= goodput.e2el_ms))
    total_in = sum(arrays["input_lens"][i] for i in ok)
    cached = arrays.get("cached_lens") or [0] * len(arrays["errors"])
    metrics: dict[str, object] = {
        "duration": duration_s, "completed": len(ok), "failed": len(arrays["errors"]) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": sum(out_lens),
        "total_cached_tokens": sum(cached[i] for i in ok),  # prompt tokens the prefix cache served
        "request_throughput": len(ok) / duration_s, "request_goodput": good / duration_s if goodput else None,
        "output_throughput": sum(out_lens) / duration_s, "total_token_throughput": (total_in + sum(out_lens)) / duration_s,
        "slo_attainment": good / len(arrays["errors"]) if arrays["errors"] and goodput else None,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        metrics.update(_stats(name, values, percentiles))
    if "structured" in arrays:
        metrics.update(_structured_metrics(arrays, ok))
    return metrics


def _structured_metrics(arrays: dict[str, list], ok: list[int]) -> dict[str, object]:
    """How many requests carried a structured output, how many of those completed and followed it (a JSON or
    choice text cut at its length does not, as in vLLM's benchmark; `structured_truncated` counts those
    cut), and the mean TPOT of the completed ones with and without one."""
    kinds, valid = arrays["structured"], arrays["structured_follows"]
    done = [i for i in ok if kinds[i]]
    followed = sum(1 for i in done if valid[i])
    cut = sum(1 for i in done if arrays["finish_reasons"][i] == "length" and kinds[i] != "regex")

    def mean_tpot(rows: list[int]) -> float | None:
        tpots = [(arrays["latencies"][i] - arrays["ttfts"][i]) * 1e3 / (arrays["output_lens"][i] - 1)
                 for i in rows if arrays["output_lens"][i] > 1]
        return statistics.fmean(tpots) if tpots else None

    return {"structured_requests": sum(1 for k in kinds if k), "structured_completed": len(done),
            "structured_correct": followed, "structured_correct_rate": followed / len(done) if done else None,
            "structured_truncated": cut,
            "mean_tpot_ms_structured": mean_tpot(done), "mean_tpot_ms_unstructured": mean_tpot(
                [i for i in ok if not kinds[i]])}


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--dataset", default="trace", choices=["trace", "random"])
    p.add_argument("--trace", type=Path, default=None, help="Azure-style CSV (TIMESTAMP, ContextTokens, GeneratedTokens)")
    p.add_argument("--num-prompts", type=checked(int, "--num-prompts", 1), default=200)
    p.add_argument("--arrival", default="poisson", choices=["trace", "poisson", "gamma"],
                   help="trace: the trace's own gaps, scaled to --request-rate when it is set; poisson; gamma "
                        "(see --burstiness)")
    p.add_argument("--request-rate", type=checked(float, "--request-rate", 0.0, inclusive=False),
                   default=float("inf"), help="requests/s (inf, the default: all at once; with --arrival trace, "
                                              "the trace's own times)")
    p.add_argument("--burstiness", type=checked(float, "--burstiness", 0.0, inclusive=False), default=1.0,
                   help="gamma shape: 1 is Poisson, < 1 burstier (with --arrival poisson too, as vLLM's flag)")
    p.add_argument("--random-input-len", type=checked(int, "--random-input-len", 1), default=1024)
    p.add_argument("--random-output-len", type=checked(int, "--random-output-len", 1), default=128)
    p.add_argument("--random-range-ratio", type=checked(float, "--random-range-ratio", 0.0, True, 1.0), default=1.0,
                   help="random dataset: lengths drawn from [len x ratio, len] (0 <= ratio <= 1)")
    p.add_argument("--random-prefix-len", type=checked(int, "--random-prefix-len", 0), default=0,
                   help="random dataset: tokens of one shared prefix before each prompt's random part (vLLM's "
                        "flag; exercises the prefix cache)")
    p.add_argument("--max-concurrency", type=checked(int, "--max-concurrency", 1), default=None)
    p.add_argument("--reset-prefix-cache", action="store_true",
                   help="empty the server's prefix cache before the run (ResetPrefixCache; SGLang's --flush-cache)")
    p.add_argument("--goodput", nargs="+", default=None, help="SLOs, e.g. ttft:2000 tpot:50")
    p.add_argument("--metric-percentiles", type=parse_percentiles, default=PERCENTILES,
                   help="percentiles of TTFT, TPOT, ITL and end-to-end latency to report, e.g. 50,90,99,99.9 "
                        "(keys as vLLM's: p99.9_ttft_ms); default 50,90,99")
    p.add_argument("--request-timeout", type=checked(float, "--request-timeout", 0.0, inclusive=False),
                   default=REQUEST_TIMEOUT_S, help="seconds a request may stream before it counts as failed "
                                                   "(DEADLINE_EXCEEDED; default 6 h, as vLLM's client)")
    p.add_argument("--structured-output-ratio", type=checked(float, "--structured-output-ratio", 0.0, True, 1.0),
                   default=0.0, help="the fraction of requests (drawn with --seed) that carry a structured output")
    p.add_argument("--structured-output", default="regex", choices=STRUCTURED_KINDS,
                   help="their kind: regex (lowercase words: runs to its length, costing only the masks), json "
                        "(an object listing strings: ends when the model closes it) or choice (one of three words)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", type=Path, default=None, help="write the metrics and per-request arrays (JSON)")
    p.add_argument("--no-progress", action="store_true")


def workload_from_args(args: argparse.Namespace) -> list[TraceRequest]:
    if args.dataset == "random":
        return random_workload(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed, args.random_prefix_len)
    if args.trace is None:
        raise SystemExit("duetserve bench serve: error: --dataset trace needs --trace FILE")
    return load_trace(args.trace, limit=args.num_prompts)


def arrival_name(mode: str, burstiness: float) -> str:
    """What the arrivals were: poisson with a burstiness other than 1 is gamma."""
    return "gamma" if mode == "poisson" and burstiness != 1.0 else mode


def send_times_from_args(args: argparse.Namespace, workload: list[TraceRequest]) -> list[float]:
    """Each request's send time (s) under the flags; ValueError for flags that do not go together."""
    rate = None if args.request_rate == float("inf") else args.request_rate
    return arrivals(workload, args.arrival, rate, args.burstiness, args.seed)


async def bench(args: argparse.Namespace, workload: list[TraceRequest] | None = None,
                send_times: list[float] | None = None) -> dict[str, object]:
    """`workload` and `send_times`: the requests and their times already drawn from the flags (None:
    draw them here)."""
    goodput = Goodput.parse(args.goodput)
    workload = workload if workload is not None else workload_from_args(args)
    send_times = send_times if send_times is not None else send_times_from_args(args, workload)
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        dropped = (await stub.ResetPrefixCache(pb.ResetPrefixCacheRequest())).blocks_dropped \
            if args.reset_prefix_cache else None
        prefix = args.random_prefix_len if args.dataset == "random" else 0
        records, duration = await run_load(stub, workload, send_times, vocab_size=info.vocab_size,
                                           max_model_len=info.max_model_len, seed=args.seed,
                                           show_progress=not args.no_progress, max_concurrency=args.max_concurrency,
                                           prefix_len=prefix, timeout_s=args.request_timeout,
                                           structured_ratio=args.structured_output_ratio,
                                           structured_kind=args.structured_output)
    arrays = per_request(records)
    rate = args.request_rate if args.request_rate < float("inf") else "inf"  # as vLLM's (strict JSON has no inf)
    result = {"model_id": info.model, "policy": info.policy, "request_rate": rate,
              "burstiness": args.burstiness, "arrival": arrival_name(args.arrival, args.burstiness),
              "num_prompts": len(workload),
              "prefix_cache_blocks_dropped": dropped,  # before the run, with --reset-prefix-cache
              **compute_metrics(arrays, duration, goodput, args.metric_percentiles), **arrays}
    if args.result_file:
        args.result_file.write_text(json.dumps(result) + "\n")
    return result


def format_result(result: dict[str, object]) -> str:
    """The run's counts and throughputs, then TTFT, TPOT and ITL: the mean and each percentile reported."""
    keys = ["completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
            "total_cached_tokens"]
    for name in ("ttft", "tpot", "itl"):
        keys += [f"mean_{name}_ms", *(k for k in result if k.startswith("p") and k.endswith(f"_{name}_ms"))]
    if "structured_requests" in result:
        keys += ["structured_requests", "structured_completed", "structured_correct", "mean_tpot_ms_structured",
                 "mean_tpot_ms_unstructured"]
    return "\n".join(f"{k:>22}: {result[k]:.2f}" if isinstance(result[k], float) else f"{k:>22}: {result[k]}"
                     for k in keys)
