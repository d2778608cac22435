"""Decode GEMMs by BLAS library: each Qwen3-8B projection at small M, timed inside a CUDA graph (no
launch overhead), as a fraction of the time its weight read takes at the measured copy bandwidth.

A decode step is bandwidth-bound: its GEMMs should read their weights at close to the copy rate.
This measures whether cuBLAS (torch's default) or cuBLASLt picks the better kernels for the shapes
a decode step runs, so the data plane can prefer one. GPU only.

    python benchmarks/gemm_lib.py --out /tmp/out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataplane.models.config import ModelConfig  # noqa: E402
from dataplane.models.presets import PRESETS  # noqa: E402

REPS = 20


def shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each fused decode projection, as the CUDA path runs them."""
    h = cfg.hidden_size
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, h), "o": (h, cfg.q_size),
            "gate_up": (2 * cfg.intermediate_size, h), "down": (h, cfg.intermediate_size),
            "lm_head": (cfg.vocab_size, h)}


def copy_bandwidth(device: torch.device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1000)


def graph_ms(fn, device: torch.device) -> float:  # noqa: ANN001
    """Per-call time of `fn` replayed REPS times in one CUDA graph."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    for _ in range(2):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * REPS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--libraries", default="cublas,cublaslt")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = PRESETS[args.model]
    bw = copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write)", flush=True)
    rows = []
    for name, (n, k) in shapes(cfg).items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
        floor_ms = n * k * 2 / bw * 1000
        for m in (int(b) for b in args.batches.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            row: dict[str, object] = {"gemm": name, "n": n, "k": k, "m": m, "floor_ms": floor_ms}
            for lib in args.libraries.split(","):
                torch.backends.cuda.preferred_blas_library(lib)
                ms = graph_ms(lambda x=x, w=w: F.linear(x, w), device)
                row[f"{lib}_ms"] = ms
                row[f"{lib}_ratio"] = ms / floor_ms
            torch.backends.cuda.preferred_blas_library("cublas")
            rows.append(row)
            print(" ".join(f"{key}={val:.4f}" if isinstance(val, float) else f"{key}={val}"
                           for key, val in row.items()), flush=True)
        del w
    per_layer = {"qkv", "o", "gate_up", "down"}
    totals = {}
    for m in sorted({r["m"] for r in rows}):
        for lib in args.libraries.split(","):
            ms = sum(r[f"{lib}_ms"] * (cfg.num_layers if r["gemm"] in per_layer else 1)
                     for r in rows if r["m"] == m)
            floor = sum(r["floor_ms"] * (cfg.num_layers if r["gemm"] in per_layer else 1)
                        for r in rows if r["m"] == m)
            totals[f"m{m}_{lib}"] = {"ms": ms, "floor_ms": floor, "ratio": ms / floor}
            print(f"step GEMMs M={m} {lib}: {ms:.2f} ms against {floor:.2f} ms ({ms / floor:.2f}x)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gemm-lib.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                "copy_bytes_per_s": bw, "rows": rows, "step_totals": totals}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
