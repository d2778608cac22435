"""Trace replay through the public gRPC API, and the serving metrics users expect from it.

`load_trace` reads an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens);
`replay` sends each request at its scaled arrival time as a prompt of that many token ids with
`ignore_eos` and `max_tokens = GeneratedTokens`, and records when every streamed message arrived;
`summarise` turns that into TTFT, TPOT, inter-token latency, throughput and goodput under SLOs.
Times are divided by `time_scale`, so a simulated data plane running faster than real time reports
simulated seconds. It is a client: it speaks only protos/, and decides nothing for the server.
"""

from __future__ import annotations

import asyncio
import csv
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # since the trace's first request
    prompt_tokens: int
    output_tokens: int


def _timestamp(text: str) -> float:
    """'2023-11-16 18:17:03.9799600' (7 fractional digits) -> POSIX seconds."""
    whole, _, frac = text.strip().partition(".")
    return datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp() + (float(f"0.{frac}") if frac else 0.0)


TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """The trace's first `limit` requests, arrivals from 0; ValueError naming the file and line for a
    file that is not such a trace (a missing column, an unreadable time or count)."""
    if limit is not None and limit < 1:
        raise ValueError(f"the number of requests to read must be >= 1, got {limit}")
    out: list[TraceRequest] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace CSV: no column {', '.join(missing)} "
                             f"(it needs {', '.join(TRACE_COLUMNS)})")
        for row in reader:
            try:
                prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                if prompt < 1 or output < 0:
                    raise ValueError(f"token counts must be positive, got {prompt} and {output}")
                out.append(TraceRequest(_timestamp(row["TIMESTAMP"] or ""), prompt, max(output, 1)))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{reader.line_num}: {exc}") from None
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no requests")
    start = min(r.arrival_s for r in out)
    return sorted((TraceRequest(r.arrival_s - start, r.prompt_tokens, r.output_tokens) for r in out),
                  key=lambda r: r.arrival_s)


@dataclass
class RequestRecord:
    """One replayed request; times in wall seconds since the replay began."""

    index: int
    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in the message)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache
    finish_reason: str = ""
    error: str = ""
    priority: int = 0  # what it was sent with (GenerateRequest.priority)
    structured: str = ""  # the kind of structured output it was sent with ("" none)
    text: str = ""  # what it generated (kept only for a structured output, to check it)


def make_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(16, vocab_size) for _ in range(length)]


async def _one(stub: pb_grpc.GenerationStub, record: RequestRecord, prompt: list[int], t0: float) -> None:
    # greedy and unpenalised, whatever defaults the model's generation config sets
    request = pb.GenerateRequest(max_tokens=record.max_tokens, temperature=0.0, repetition_penalty=1.0,
                                 ignore_eos=True)
    request.token_ids.ids.extend(prompt)
    record.sent = time.monotonic() - t0
    try:
        async for response in stub.Generate(request):
            now = time.monotonic() - t0
            if response.token_ids:
                record.chunks.append((now, len(response.token_ids)))
            if response.finish_reason:
                record.finish_reason = response.finish_reason
                record.completion_tokens = response.completion_tokens
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"


async def replay(stub: pb_grpc.GenerationStub, trace: list[TraceRequest], *, vocab_size: int, max_model_len: int,
                 rate_scale: float = 1.0, time_scale: float = 1.0, seed: int = 0) -> list[RequestRecord]:
    """Send every request at `arrival / rate_scale` (simulated s); wait for all to finish."""
    rng = random.Random(seed)
    t0 = time.monotonic()
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    for i, req in enumerate(trace):
        max_tokens = min(req.output_tokens, max_model_len - 1)
        prompt_len = max(1, min(req.prompt_tokens, max_model_len - max_tokens))
        record = RequestRecord(i, prompt_len, max_tokens)
        records.append(record)
        prompt = make_prompt(rng, prompt_len, vocab_size)
        delay = req.arrival_s / rate_scale * time_scale - (time.monotonic() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(stub, record, prompt, t0)))
    await asyncio.gather(*tasks)
    return records


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarise(records: list[RequestRecord], *, time_scale: float, ttft_slo_ms: float,
              tbt_slo_ms: float) -> dict[str, object]:
    """Latency percentiles (ms), throughput and goodput, in simulated time."""
    scale = 1.0 / time_scale
    done = [r for r in records if r.chunks and not r.error]
    ttft = [(r.chunks[0][0] - r.sent) * scale * 1e3 for r in done]
    tpot: list[float] = []
    itl: list[float] = []
    good = 0
    for r, first in zip(done, ttft):
        n = sum(k for _, k in r.chunks)
        per_token = ((r.chunks[-1][0] - r.chunks[0][0]) * scale * 1e3 / (n - 1)) if n > 1 else 0.0
        if n > 1:
            tpot.append(per_token)
        for (prev, _), (now, k) in zip(r.chunks, r.chunks[1:]):
            itl.extend([(now - prev) * scale * 1e3 / k] * k)
        good += first <= ttft_slo_ms and per_token <= tbt_slo_ms
    start = min((r.sent for r in records), default=0.0)
    end = max((r.chunks[-1][0] for r in done), default=start)
    span = max((end - start) * scale, 1e-9)
    out_tokens = sum(r.completion_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    return {
        "requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "duration_s": span, "request_throughput": len(done) / span,
        "output_throughput_tok_s": out_tokens / span, "total_throughput_tok_s": (in_tokens + out_tokens) / span,
        "goodput_req_s": good / span, "slo_attainment": good / len(records) if records else 0.0,
        "ttft_ms": _pct(ttft), "tpot_ms": _pct(tpot), "itl_ms": _pct(itl),
    }
