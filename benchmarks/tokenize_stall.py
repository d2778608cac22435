"""How long a long text prompt freezes the control plane's event loop (which runs the engine's step
loop and every stream), on the CPU.

1. Loop level: the worst gap of a 1 ms ticker on the loop while one text is encoded (a) inline with
   `tokenizers`' `encode` (what the API did before), (b) with `encode` on a worker thread (it holds
   the GIL: no better), (c) with `HFTokenizer.encode` on a worker thread (the batch call, which
   releases the GIL: what the API does now).
2. End to end: both planes serving a tiny checkpoint with a BPE tokenizer on the CPU; one request
   streams tokens while another sends a long text prompt (refused once tokenized: longer than
   max_model_len); the streaming request's worst gap between messages against its median gap.

Uses the tests' checkpoint and tokenizer writers. Prints a table and writes
benchmarks/results/tokenize-stall-cpu.json.

    python benchmarks/tokenize_stall.py [--chars 100000,1000000] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb  # noqa: E402
from controlplane.tokenizer import HFTokenizer  # noqa: E402
from tests.dataplane.checkpoints import TINY_VOCAB, write_tiny_checkpoint  # noqa: E402
from tests.e2e.conftest import serve  # noqa: E402
from tests.factories import write_tokenizer  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "serving", "token", "prefill", "decode", "的", "😀", "fox"]


def _text(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(chars // 5))[:chars]


async def _worst_gap(work: Callable[[], object], threaded: bool) -> tuple[float, float]:
    """(seconds the work took, worst gap of a 1 ms ticker on the loop meanwhile)."""
    stop, worst = asyncio.Event(), [0.0]

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst[0], last = max(worst[0], now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    start = time.perf_counter()
    if threaded:
        await asyncio.to_thread(work)
    else:
        work()
    took = time.perf_counter() - start
    stop.set()
    await ticker
    return took, worst[0]


async def loop_level(tokenizer: HFTokenizer, sizes: list[int]) -> list[dict[str, object]]:
    raw = tokenizer._tokenizer  # the library's own object, for the calls the API used to make
    rows = []
    for chars in sizes:
        text = _text(chars)
        for mode, work, threaded in (("encode inline (before)", lambda: raw.encode(text), False),
                                     ("encode on a thread", lambda: raw.encode(text), True),
                                     ("HFTokenizer.encode on a thread (now)", lambda: tokenizer.encode(text), True)):
            took, worst = await _worst_gap(work, threaded)
            rows.append({"chars": chars, "mode": mode, "encode_ms": took * 1e3, "worst_loop_gap_ms": worst * 1e3})
            print(f"{chars:>9} chars  {mode:<38} encode {took * 1e3:8.1f} ms  worst loop gap {worst * 1e3:8.1f} ms")
    return rows


async def end_to_end(folder: Path, chars: int) -> dict[str, object]:
    async with serve(str(folder), max_model_len=512) as served:
        stream = served.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), max_tokens=400,
                                                         ignore_eos=True, temperature=0.0))
        times: list[float] = []

        async def read() -> None:
            while (message := await stream.read()) != grpc.aio.EOF:
                times.append(time.perf_counter())
                if message.finish_reason:
                    return

        reader = asyncio.create_task(read())
        while len(times) < 20:
            await asyncio.sleep(0.005)
        sent = time.perf_counter()
        try:
            await served.stub.Generate(pb.GenerateRequest(text=_text(chars), max_tokens=1)).read()
            refused = ""
        except grpc.aio.AioRpcError as exc:
            refused = exc.code().name
        answered = time.perf_counter()
        await reader
    gaps = [b - a for a, b in zip(times, times[1:])]
    during = [b - a for a, b in zip(times, times[1:]) if b >= sent and a <= answered]
    row = {"chars": chars, "long_prompt_answer_ms": (answered - sent) * 1e3, "long_prompt_status": refused,
           "median_gap_ms": statistics.median(gaps) * 1e3, "worst_gap_during_ms": max(during, default=0.0) * 1e3,
           "messages": len(times)}
    print(f"end to end, {chars} chars: the long prompt answered {refused or 'OK'} in "
          f"{row['long_prompt_answer_ms']:.0f} ms; the stream's median gap {row['median_gap_ms']:.1f} ms, "
          f"worst meanwhile {row['worst_gap_during_ms']:.1f} ms")
    return row


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", default="100000,1000000", help="comma-separated prompt lengths in characters")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tokenize-stall-cpu.json")
    args = parser.parse_args()
    sizes = [int(x) for x in args.chars.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_checkpoint(Path(tmp) / "qwen3", "qwen3")
        write_tokenizer(folder, TINY_VOCAB)
        rows = await loop_level(HFTokenizer(folder / "tokenizer.json"), sizes)
        e2e = await end_to_end(folder, max(sizes))
    result = {"machine": platform.node(), "python": platform.python_version(), "loop_level": rows,
              "end_to_end": e2e}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
