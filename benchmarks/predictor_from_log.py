"""Rebuild benchmarks/results/predictor-<gpu>.json from the per-sample lines `predictor.py` prints,
when a run's JSON did not come back (same scoring code: shuffled online replay + in-sample fit).

    python benchmarks/predictor_from_log.py predictor.log --gpu h100 --device "NVIDIA H100 80GB HBM3"
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.predictor import fitted_mape, score_online  # noqa: E402
from controlplane.predictor import Predictor  # noqa: E402
from shared.profiles import H100_DECLARED  # noqa: E402
from shared.roofline import ModelShape  # noqa: E402

LINE = re.compile(r"S=(\d+)\s+(\w+)\s+decode\s+(\d+) x c(\d+)\s+chunks (\[.*?\])\s+measured\s+([\d.]+) ms\s+"
                  r"roofline\s+([\d.]+) ms")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("log")
    p.add_argument("--gpu", default="h100")
    p.add_argument("--device", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="")
    args = p.parse_args()
    samples = []
    for line in Path(args.log).read_text().splitlines():
        m = LINE.search(line)
        if m:
            sms, regime, batch, ctx, chunks, measured, raw = m.groups()
            samples.append({"sms": int(sms), "regime": regime, "batch": int(batch), "decode_context": int(ctx),
                            "chunks": ast.literal_eval(chunks), "measured_ms": float(measured), "raw_ms": float(raw)})
    if not samples:
        raise SystemExit("no sample lines found")
    from dataplane.models.presets import PRESETS  # only for a Predictor object; scoring uses raw/measured

    cfg = PRESETS["qwen3-8b"]
    shape = ModelShape(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_q_heads=cfg.num_q_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       vocab_size=cfg.vocab_size)
    predictor = Predictor(shape, H100_DECLARED)  # the correction state only; raw times come from the log
    report = score_online(predictor, samples, args.seed)
    by = {r: m for r, (_, m, _) in report.by_regime.items()}
    result = {
        "summary": {"gpu": args.gpu, "mape": report.mape, "n_samples": report.count,
                    "mape_by_regime": {r: by.get(r) for r in ("decode", "prefill", "mixed")}},
        "device": args.device, "model": "qwen3-8b", "sm_counts": sorted({s["sms"] for s in samples}),
        "mape_definition": "online: per-regime correction (affine, forgetting) learnt in a shuffled replay of the "
                           "samples, each scored before it is learnt from",
        "mape_raw_roofline": report.raw_mape,
        "mape_raw_by_regime": {r: raw for r, (_, _, raw) in report.by_regime.items()},
        "mape_fitted_affine_in_sample": fitted_mape(samples),
        "note": args.note, "samples": samples,
    }
    out = ROOT / f"benchmarks/results/predictor-{args.gpu}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1), f"\nraw {report.raw_mape:.3f}", f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
