"""Does pulling a decode GEMM's first weights into L2 while a small kernel runs shorten the GEMM?

A decode step at B=16 reads its weights at ~95% of the copy rate inside the GEMMs, but between them
small latency-bound kernels (add+RMSNorm ~2.9 us, SwiGLU ~1.7 us, split-K reduces ~2 us) leave HBM idle
for ~12 us a layer (`decode-profile-h100.md`). This asks, on one GPU, before any data-plane change:

1. how long a kernel takes to prefetch X MiB into L2 three ways: `prefetch.global.L2::evict_last` per
   128-byte line (`pf`), `cp.async.bulk.prefetch.L2` per 4 KiB chunk (`bulk`, sm90), or loading the lines
   (`load`) -- near-zero time for the first two would mean the hardware takes them fire-and-forget;
2. for a projection's shape at 16 rows (QKV 6144x4096, gate/up 24576x4096, down 4096x12288), each of
   `LAYERS` layers with its own weights (so L2 never holds the next one's): the small kernel then the
   GEMM (`base`); the same with the first X MiB of the GEMM's weights prefetched on a side stream while
   the small kernel runs, joined before the GEMM (`side`); prefetched first on the same stream (`serial`);
   and the GEMM alone, and right after itself (`warm`; these weights do not fit the usable L2, so it is
   no faster), all in CUDA graphs. The small kernel is torch's RMSNorm (~4.4 us on an H100), longer than
   the data plane's add+RMSNorm (~2.9 us) and SwiGLU (~1.7 us): the gains here are upper bounds.

Prints a table and writes `<out>/l2-prefetch-<gpu>.json`. GPU only (the prefetch is inline PTX).

    python benchmarks/l2_prefetch.py --out /tmp/out
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import gpu_slug  # noqa: E402
from benchmarks.gemm_lib import copy_bandwidth  # noqa: E402

LAYERS = 24
ROWS = 16
REPS = 10
LINE = 128  # bytes a `pf` prefetch covers
CHUNK = 4096  # bytes a `bulk` prefetch covers
SHAPES = {"qkv": (6144, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
MODES = ("pf", "bulk", "load")


def _kernels():  # noqa: ANN202 (Triton's JIT functions; imported on the GPU only)
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch_kernel(ptr, n_units, sink, UNIT: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):
        """Each program takes BLOCK units of UNIT bytes at a time, strided over the grid."""
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        base = ptr.to(tl.pointer_type(tl.int8))
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid * BLOCK, n_units, nprog * BLOCK):
            units = start + tl.arange(0, BLOCK)
            ok = units < n_units
            addr = base + tl.where(ok, units, 0).to(tl.int64) * UNIT
            if MODE == 0:
                r = tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                              [addr], dtype=tl.int32, is_pure=False, pack=1)
            elif MODE == 1:
                size = tl.full([BLOCK], UNIT, tl.int32)
                r = tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
                                              "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)
            else:
                words = addr.to(tl.pointer_type(tl.int32))[:, None] + tl.arange(0, UNIT // 4)[None, :]
                r = tl.sum(tl.load(words, mask=ok[:, None], other=0, eviction_policy="evict_last"), axis=1)
            acc += r
        # never true in practice (the asm writes 0; a sum of random words is not 0x7FFF_FFFF on every unit),
        # but the compiler cannot know: the work is kept
        tl.store(sink + pid, tl.sum(acc, axis=0), mask=tl.sum(acc, axis=0) == 0x7FFFFFFF)

    return prefetch_kernel


class Prefetcher:
    """Launches the prefetch kernel in one of MODES over a weight's first bytes (a grid of `programs`)."""

    def __init__(self, device: torch.device, programs: int) -> None:
        self.kernel = _kernels()
        self.sink = torch.zeros(4096, dtype=torch.int32, device=device)
        self.programs = programs

    def __call__(self, weight: torch.Tensor, nbytes: int, mode: str) -> None:
        if nbytes <= 0:
            return
        nbytes = min(nbytes, weight.numel() * weight.element_size())
        m = MODES.index(mode)
        unit = CHUNK if mode == "bulk" else LINE
        n_units = nbytes // unit
        block = 32 if mode == "load" else 128
        grid = (min(self.programs, max(1, -(-n_units // block))),)
        self.kernel[grid](weight, n_units, self.sink, UNIT=unit, BLOCK=block, MODE=m, num_warps=4)


def graph_us(body: Callable[[], object], device: torch.device, per: int) -> float:
    """us per unit of work: `body()` (which does `per` units) captured once, replayed REPS times."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (REPS * per)


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    copy = copy_bandwidth(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    pf = Prefetcher(device, args.programs or sms)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    result: dict = {"gpu": torch.cuda.get_device_name(device), "copy_tb_s": copy / 1e12, "layers": LAYERS,
                    "rows": ROWS, "programs": pf.programs, "prefetch_alone": [], "gemm": []}
    print(f"{result['gpu']}: copy {copy / 1e12:.2f} TB/s, {sms} SMs, prefetch grid {pf.programs}")

    big = torch.empty(64 << 20, dtype=torch.bfloat16, device=device)  # 128 MB: prefetch timing source
    for mode in MODES:
        for mb in args.mbs:
            def body(mode: str = mode, mb: float = mb) -> None:
                for i in range(LAYERS):  # a different 32 MB window each time, L2 flushed in between
                    flush.zero_()
                    pf(big[(i % 2) * (16 << 20):], int(mb * (1 << 20)), mode)
            t_with = graph_us(body, device, LAYERS)
            t_flush = graph_us(lambda: [flush.zero_() for _ in range(LAYERS)], device, LAYERS)
            row = {"mode": mode, "mb": mb, "us": t_with - t_flush}
            result["prefetch_alone"].append(row)
            print(f"prefetch {mode:4s} {mb:5.1f} MB alone: {row['us']:7.2f} us "
                  f"(at the copy rate {mb * (1 << 20) / copy * 1e6:.2f} us)")
    del big

    for name in args.shapes:
        n, k = SHAPES[name]
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02 for _ in range(LAYERS)]
        x = torch.randn(ROWS, k, dtype=torch.bfloat16, device=device)
        h = torch.randn(ROWS, 4096, dtype=torch.bfloat16, device=device)
        g = torch.ones(4096, dtype=torch.bfloat16, device=device)
        out = torch.empty(ROWS, n, dtype=torch.bfloat16, device=device)
        side = torch.cuda.Stream(device)
        floor_us = n * k * 2 / copy * 1e6

        def small() -> None:  # the add+RMSNorm's stand-in: a latency-bound kernel on [16, 4096]
            F.rms_norm(h, (4096,), g, 1e-6)

        def gemm(w: torch.Tensor) -> None:
            torch.matmul(x, w.t(), out=out)

        cases = {
            "gemm": lambda: [gemm(w) for w in weights],
            "warm": lambda: [gemm(w) for w in weights for _ in range(2)],
            "small": lambda: [small() for _ in weights],
            "base": lambda: [(small(), gemm(w)) for w in weights],
        }
        base_row: dict = {"shape": name, "n": n, "k": k, "floor_us": floor_us}
        for case, body in cases.items():
            per = 2 * LAYERS if case == "warm" else LAYERS
            t = graph_us(body, device, per)
            if case == "warm":
                t = 2 * t - graph_us(cases["gemm"], device, LAYERS)  # the second call of each pair
            base_row[f"{case}_us"] = t
        result["gemm"].append(base_row)
        print(f"{name} {n}x{k} at {ROWS} rows: floor {floor_us:.1f} us, GEMM {base_row['gemm_us']:.1f}, "
              f"L2-warm {base_row['warm_us']:.1f}, small {base_row['small_us']:.2f}, "
              f"small+GEMM {base_row['base_us']:.1f}")

        for mode in MODES:
            for mb in args.mbs:
                nbytes = int(mb * (1 << 20))

                def serial(mode: str = mode, nbytes: int = nbytes) -> None:
                    for w in weights:
                        pf(w, nbytes, mode)
                        small()
                        gemm(w)

                def on_side(mode: str = mode, nbytes: int = nbytes) -> None:
                    main = torch.cuda.current_stream(device)
                    for w in weights:
                        side.wait_stream(main)
                        with torch.cuda.stream(side):
                            pf(w, nbytes, mode)
                        small()
                        main.wait_stream(side)
                        gemm(w)

                row = {"shape": name, "mode": mode, "mb": mb,
                       "serial_us": graph_us(serial, device, LAYERS), "side_us": graph_us(on_side, device, LAYERS)}
                row["side_gain_us"] = base_row["base_us"] - row["side_us"]
                row["serial_gain_us"] = base_row["base_us"] - row["serial_us"]
                result["gemm"].append(row)
                print(f"  {mode:4s} {mb:5.1f} MB: side {row['side_us']:7.2f} us ({row['side_gain_us']:+.2f}), "
                      f"serial {row['serial_us']:7.2f} ({row['serial_gain_us']:+.2f})", flush=True)
        del weights
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), type=lambda s: s.split(","))
    p.add_argument("--mbs", default="2,4,8,16", type=lambda s: [float(v) for v in s.split(",")])
    p.add_argument("--programs", type=int, default=0, help="prefetch grid (0: one program an SM)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("l2_prefetch: needs a CUDA GPU", file=sys.stderr)
        return 2
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"l2-prefetch-{gpu_slug(torch.device('cuda'))}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
