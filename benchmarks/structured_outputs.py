"""What structured outputs cost: the same batch of streams through `duetserve serve` (the real data plane on
`--gpu cuda` or `cpu`, `--model`, random weights) with no grammar, every stream under a regex of exactly
`--output-len` characters (one token each: the presets' byte vocabulary), and half of each; then a JSON
schema batch whose every output must parse and fit the schema. A structured stream needs each token back
before its next mask: the server plans the next step anyway and sends its masks after it (its forward runs
while the grammars catch up; the default), or with `--no-defer-token-masks` runs the steps one at a time
while one is in flight: the free streams' TPOT beside structured ones, and the structured batch's, are
the figures to watch. Prints a table; writes
benchmarks/results/structured-outputs-<dev>[-one-at-a-time].json.

    python benchmarks/structured_outputs.py [--gpu cuda] [--model qwen3-8b] [--concurrency 64]
        [--output-len 256] [--no-defer-token-masks] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.stream_throughput import SERVER, start_server  # noqa: E402
from controlplane.launcher import stop_process  # noqa: E402
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb  # noqa: E402
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from shared.config import SchedulerConfig  # noqa: E402

# stream_throughput's server, which also prints its scheduler's running totals on SIGUSR1 (steps, GPU busy
# time, the host's time from a result to the next plan): the benchmark reads them after each batch
anchor = "    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)\n"
assert anchor in SERVER
STATS_SERVER = SERVER.replace(anchor, anchor + """
    def report():
        s = plane.engine.scheduler.stats
        print("stats", json.dumps([sum(s.steps.values()), sum(s.busy_ms.values()), s.host_gap_s, s.host_gaps,
                                   s.masks_followed]), flush=True)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, report)
""")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "name", "tags", "ok"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                         "name": {"type": "string", "maxLength": 24},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
                         "ok": {"type": "boolean"}}}


def fits_schema(text: str) -> bool:
    """Whether `text` is a JSON value of SCHEMA (checked by hand: no jsonschema dependency)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (isinstance(value, dict) and set(value) == {"id", "name", "tags", "ok"}
            and isinstance(value["id"], int) and 0 <= value["id"] <= 99999
            and isinstance(value["name"], str) and len(value["name"]) <= 24
            and isinstance(value["tags"], list) and len(value["tags"]) <= 4
            and all(t in ("a", "b", "c") for t in value["tags"]) and isinstance(value["ok"], bool))


async def one(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> dict[str, object]:
    start = time.perf_counter()
    times: list[float] = []
    text, tokens, reason = "", 0, ""
    async for message in stub.Generate(request):
        if message.token_ids:
            times.append(time.perf_counter())
        tokens += len(message.token_ids)
        text += message.text
        reason = message.finish_reason or reason
    ttft = (times[0] - start) * 1e3 if times else float("nan")
    tpot = (times[-1] - times[0]) * 1e3 / (tokens - 1) if tokens > 1 else float("nan")
    return {"tokens": tokens, "text": text, "finish_reason": reason, "ttft_ms": ttft, "tpot_ms": tpot}


def requests(kind: str, n: int, args: argparse.Namespace) -> list[tuple[str, pb.GenerateRequest]]:
    """`kind`: free, regex, mixed (alternating) or json. Prompts are distinct random byte ids."""
    out = []
    for i in range(n):
        ids = [32 + (i * 7919 + j * 104729) % 95 for j in range(args.prompt_len)]  # printable bytes
        structured = kind in ("regex", "json") or (kind == "mixed" and i % 2 == 1)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_tokens=args.output_len, ignore_eos=True,
                                     temperature=0.0)
        if kind == "json":  # ends when the object is complete; room for the longest one the schema allows
            request.max_tokens = max(args.output_len, 160)
            request.structured_outputs.CopyFrom(pb.StructuredOutputs(json=json.dumps(SCHEMA),
                                                                     disable_any_whitespace=True))
        elif structured:
            request.structured_outputs.CopyFrom(pb.StructuredOutputs(regex=f"[a-z]{{{args.output_len}}}"))
        out.append(("structured" if structured else "free", request))
    return out


async def run_batch(port: int, kind: str, args: argparse.Namespace) -> dict[str, object]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        batch = requests(kind, args.concurrency, args)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(stub, request) for _, request in batch))
        wall = time.perf_counter() - start
    row: dict[str, object] = {"batch": kind, "streams": len(batch), "wall_s": wall,
                              "output_tok_s": sum(int(r["tokens"]) for r in results) / wall}
    for cls in ("free", "structured"):
        mine = [r for (c, _), r in zip(batch, results) if c == cls]
        if not mine:
            continue
        tpots = sorted(float(r["tpot_ms"]) for r in mine)
        row[cls] = {"streams": len(mine), "tokens": sum(int(r["tokens"]) for r in mine),
                    "mean_tpot_ms": statistics.fmean(tpots), "p99_tpot_ms": tpots[min(len(tpots) - 1,
                                                                                   int(0.99 * len(tpots)))],
                    "mean_ttft_ms": statistics.fmean(float(r["ttft_ms"]) for r in mine),
                    "finish_reasons": sorted({str(r["finish_reason"]) for r in mine})}
        if cls == "structured":
            check = fits_schema if kind == "json" else re.compile(f"[a-z]{{{args.output_len}}}").fullmatch
            row[cls]["valid"] = sum(bool(check(str(r["text"]))) for r in mine)  # type: ignore[index]
    return row


def server_totals(server: subprocess.Popen) -> list[float]:
    """The server's running totals (steps, GPU busy ms, result-to-plan seconds, gaps counted, steps whose
    masks followed their plan)."""
    assert server.stdout is not None
    server.send_signal(signal.SIGUSR1)
    line = server.stdout.readline().split(maxsplit=1)
    if len(line) != 2 or line[0] != "stats":
        raise RuntimeError(f"the server answered {line!r} for its totals")
    return [float(x) for x in json.loads(line[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="cpu",
                        help="cuda or cpu: the real data plane on that device; else a GPU the simulated data plane "
                             "plays (h100, h200: its roofline step times; it honours masks, its tokens a hash)")
    parser.add_argument("--model", default="tiny", help="a preset (random weights, byte vocabulary)")
    parser.add_argument("--concurrency", type=int, default=16, help="streams in each batch, all at once")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--defer-token-masks", action=argparse.BooleanOptionalAction,
                        default=SchedulerConfig().defer_token_masks,
                        help="the server plans a step while a structured output's token is in flight, its masks "
                             "sent after it (SchedulerConfig.defer_token_masks, the default); off: one at a time")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/structured-outputs-<gpu>.json")
    args = parser.parse_args()
    suffix = "" if args.defer_token_masks else "-one-at-a-time"
    args.out = args.out or ROOT / "benchmarks" / "results" / f"structured-outputs-{args.gpu}{suffix}.json"
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryFile(mode="w+", errors="replace") as errors:
        server, port = start_server(ROOT, STATS_SERVER, [str(args.port), "1.0", args.gpu, "1", args.model,
                                                         json.dumps({"defer_token_masks": args.defer_token_masks})],
                                    errors)
        try:
            asyncio.run(run_batch(port, "free", args))  # warm-up: graphs, the grammar vocabulary
            asyncio.run(run_batch(port, "regex", args))
            before = server_totals(server)
            for kind in ("free", "regex", "mixed", "json"):
                row = asyncio.run(run_batch(port, kind, args))
                after = server_totals(server)
                steps, busy, gap, gaps, followed = (a - b for a, b in zip(after, before))
                before = after
                row["steps"] = steps
                row["masks_follow_steps"] = followed
                row["gpu_ms_per_step"] = busy / steps if steps else None  # the data plane's step time
                row["control_plane_ms_per_step"] = 1e3 * gap / gaps if gaps else None  # result -> next plan
                rows.append(row)
                gpu_ms, host_ms = row["gpu_ms_per_step"] or 0.0, row["control_plane_ms_per_step"] or 0.0
                parts = [f"{kind:>6}: {row['output_tok_s']:8.0f} output tok/s, {steps:.0f} steps "
                         f"({followed:.0f} masks following), GPU {gpu_ms:.1f} ms, result->plan {host_ms:.1f} ms"]
                for cls in ("free", "structured"):
                    if cls in row:
                        c = row[cls]  # type: ignore[index]
                        valid = f", {c['valid']}/{c['streams']} valid" if "valid" in c else ""
                        parts.append(f"{cls} TPOT {c['mean_tpot_ms']:.1f} ms (p99 {c['p99_tpot_ms']:.1f}){valid} "
                                     f"{'/'.join(c['finish_reasons'])}")
                print("  ".join(parts), flush=True)
        finally:
            stop_process(server, 30.0, "the control plane")
    result = {"machine": platform.node(), "cpus": os.cpu_count(), "gpu": args.gpu, "model": args.model,
              "concurrency": args.concurrency, "output_len": args.output_len, "prompt_len": args.prompt_len,
              "defer_token_masks": args.defer_token_masks,
              "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
