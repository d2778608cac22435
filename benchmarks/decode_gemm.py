"""The folded decode GEMMs (`dataplane/kernels/decode_gemm.py`) against the unfolded path, on one GPU.

A decode layer's work outside attention, at M rows, over 8 layers' weights in turn (so no weight is
read from L2), replayed in a CUDA graph:
- unfolded, as `fused_forward` runs it: add+RMSNorm, QKV (cuBLAS), O (cuBLAS), add+RMSNorm, gate/up
  (cuBLAS), SwiGLU (Triton), down (cuBLAS);
- folded: QKV with the norm, O with the residual add, gate/up with the norm, down with SwiGLU and the
  residual add.
Each next to the floor (the layer's weight bytes at the measured copy rate), and checked against the
unfolded path (relative error of the QKV output and the residual). With `--tune-rows`, each folded
projection alone tries a grid of configs (tile width, K step, split) at those row counts, next to the
table's choice, so the table can be set for this GPU. Prints a table, writes `<out>/decode-gemm-<gpu>.json`.

    python benchmarks/decode_gemm.py --out /tmp/out [--rows 1,16,32,64] [--tune-rows 16,64]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import gpu_slug  # noqa: E402
from benchmarks.gemm_lib import copy_bandwidth, graph_ms, shapes  # noqa: E402
from dataplane.kernels import decode_gemm as dg  # noqa: E402
from dataplane.kernels.activation import silu_and_mul  # noqa: E402
from dataplane.models.presets import PRESETS  # noqa: E402

LAYERS = 8  # weight sets cycled through, 3 GB for Qwen3-8B: far past L2


def make_layers(cfg, device: torch.device) -> list[dict[str, torch.Tensor]]:  # noqa: ANN001
    out = []
    for _ in range(LAYERS):
        layer = {name: torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
                 for name, (n, k) in shapes(cfg).items() if name != "lm_head"}
        for norm in ("g_in", "g_post"):
            layer[norm] = 1 + 0.1 * torch.randn(cfg.hidden_size, dtype=torch.bfloat16, device=device)
        out.append(layer)
    return out


def unfolded(layer: dict, h: torch.Tensor, residual: torch.Tensor, attn: torch.Tensor, eps: float) -> torch.Tensor:
    import flashinfer

    flashinfer.norm.fused_add_rmsnorm(h, residual, layer["g_in"], eps)
    qkv = F.linear(h, layer["qkv"])
    o = F.linear(attn, layer["o"])
    flashinfer.norm.fused_add_rmsnorm(o, residual, layer["g_post"], eps)
    h.copy_(F.linear(silu_and_mul(F.linear(o, layer["gate_up"])), layer["down"]))
    return qkv


def folded(layer: dict, residual: torch.Tensor, attn: torch.Tensor, eps: float, cfgs: dict) -> torch.Tensor:
    qkv = dg.norm_gemm(residual, layer["g_in"], eps, layer["qkv"], cfgs["qkv"])
    dg.gemm_residual(attn, layer["o"], residual, cfgs["o"])
    gate_up = dg.norm_gemm(residual, layer["g_post"], eps, layer["gate_up"], cfgs["gate_up"])
    dg.act_gemm_residual(gate_up, layer["down"], residual, cfgs["down"])
    return qkv


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check(layer: dict, m: int, hidden: int, eps: float, cfgs: dict, device: torch.device) -> dict[str, float]:
    """One layer from the same state both ways: the QKV output and the residual after the layer.
    The unfolded path adds the layer's down output into the residual at the next layer's norm."""
    g = torch.Generator(device=device).manual_seed(m)
    residual = torch.randn(m, hidden, dtype=torch.bfloat16, device=device, generator=g)
    attn = torch.randn(m, hidden, dtype=torch.bfloat16, device=device, generator=g)
    h0 = torch.zeros_like(residual)
    r_unf, h = residual.clone(), h0.clone()
    qkv_unf = unfolded(layer, h, r_unf, attn, eps)
    r_unf = (r_unf.float() + h.float()).to(torch.bfloat16)
    r_fold = residual.clone()
    qkv_fold = folded(layer, r_fold, attn, eps, cfgs)
    return {"qkv_rel_err": _rel(qkv_fold, qkv_unf), "residual_rel_err": _rel(r_fold, r_unf)}


def layer_times(layers: list[dict], m: int, hidden: int, eps: float, cfgs: dict,
                device: torch.device) -> dict[str, float]:
    residual = torch.randn(m, hidden, dtype=torch.bfloat16, device=device)
    attn = torch.randn(m, hidden, dtype=torch.bfloat16, device=device)
    h = torch.randn_like(residual)
    unf = graph_ms(lambda: [unfolded(lay, h, residual, attn, eps) for lay in layers], device) / len(layers)
    fold = graph_ms(lambda: [folded(lay, residual, attn, eps, cfgs) for lay in layers], device) / len(layers)
    return {"unfolded_us": unf * 1e3, "folded_us": fold * 1e3}


def _op(name: str, layer: dict, x: torch.Tensor, residual: torch.Tensor, eps: float, cfg: dg.GemmConfig):
    if name == "qkv" or name == "gate_up":
        return dg.norm_gemm(x, layer["g_in"], eps, layer[name], cfg)
    if name == "o":
        return dg.gemm_residual(x, layer["o"], residual, cfg)
    return dg.act_gemm_residual(x, layer["down"], residual, cfg)


def tune(layers: list[dict], cfg_model, m: int, sms: int, bw: float, device: torch.device) -> list[dict]:  # noqa: ANN001
    """Each folded projection alone, over the layers' weights, for a grid of configs."""
    rows = []
    eps = cfg_model.rms_norm_eps
    for name, (n, k) in shapes(cfg_model).items():
        if name == "lm_head":
            continue
        width = 2 * k if name == "down" else k
        x = torch.randn(m, width, dtype=torch.bfloat16, device=device)
        residual = torch.randn(m, n, dtype=torch.bfloat16, device=device)
        table = dg.config_for(n, k, m, sms)
        grid = {dg.GemmConfig(bn, bk, s) for bn, bk, s in itertools.product((16, 32, 64), (128, 256), (1, 2, 4))}
        if table is not None:
            grid.add(table)
        timed = []
        for c in sorted(grid):
            if not c.fits(n, k) or n // c.block_n * c.split_k < sms // 2:
                continue
            try:
                us = graph_ms(lambda c=c: [_op(name, lay, x, residual, eps, c) for lay in layers], device)
            except Exception as e:  # noqa: BLE001 - e.g. Triton's OutOfResources
                print(f"  {name} M={m} {c}: {type(e).__name__}", flush=True)
                continue
            timed.append((us * 1e3 / len(layers), c))
        if not timed:
            print(f"tune {name:8s} M={m:<3d}: no config ran", flush=True)
            continue
        best_us, best = min(timed)
        table_us = next((us for us, c in timed if c == table), float("nan"))
        floor_us = n * k * 2 / bw * 1e6
        rows.append({"gemm": name, "m": m, "floor_us": floor_us, "table": table._asdict() if table else None,
                     "table_us": table_us,
                     "best": best._asdict(), "best_us": best_us, "configs_tried": len(timed)})
        print(f"tune {name:8s} M={m:<3d} floor {floor_us:6.1f} us  table {table_us:6.1f} {tuple(table or ())}  "
              f"best {best_us:6.1f} {tuple(best)}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--rows", default="1,16,32,64")
    p.add_argument("--tune-rows", default="", help="row counts at which to search configs (e.g. 16,64)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = PRESETS[args.model]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bw = copy_bandwidth(device)
    layers = make_layers(cfg, device)
    weight_bytes = sum(n * k * 2 for name, (n, k) in shapes(cfg).items() if name != "lm_head")
    floor_us = weight_bytes / bw * 1e6
    print(f"copy {bw / 1e12:.2f} TB/s, {sms} SMs; a layer's projections read {weight_bytes / 1e6:.0f} MB: "
          f"floor {floor_us:.1f} us", flush=True)
    t0 = time.monotonic()
    results = []
    for m in (int(r) for r in args.rows.split(",")):
        cfgs = {name: dg.config_for(n, k, m, sms) for name, (n, k) in shapes(cfg).items() if name != "lm_head"}
        row = {"m": m, "floor_us": floor_us, "configs": {k: v._asdict() for k, v in cfgs.items()},
               **check(layers[0], m, cfg.hidden_size, cfg.rms_norm_eps, cfgs, device),
               **layer_times(layers, m, cfg.hidden_size, cfg.rms_norm_eps, cfgs, device)}
        results.append(row)
        print(f"M={m:<3d} layer outside attention: unfolded {row['unfolded_us']:6.1f} us, folded "
              f"{row['folded_us']:6.1f} us (floor {floor_us:.1f}; x{row['unfolded_us'] / floor_us:.2f} -> "
              f"x{row['folded_us'] / floor_us:.2f}); rel err qkv {row['qkv_rel_err']:.1e}, residual "
              f"{row['residual_rel_err']:.1e}  [{time.monotonic() - t0:.0f} s]", flush=True)
    tuned = [r for m in args.tune_rows.split(",") if m for r in tune(layers, cfg, int(m), sms, bw, device)]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-gemm-{gpu_slug(device)}.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                "copy_bytes_per_s": bw, "model": args.model, "layers": results, "tune": tuned},
                               indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
