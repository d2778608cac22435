"""Score the latency predictor on recorded step times, offline (no GPU, no torch).

    python benchmarks/predictor_from_log.py --json benchmarks/results/predictor-h100.json [--seeds 20]
    python benchmarks/predictor_from_log.py predictor.log --gpu h100 --device "NVIDIA H100 80GB HBM3"

`--json` replays a results file's samples through the old predictor (the plain roofline, one
affine correction per regime) and the current one (launch-aware roofline, host floors, corrections
per regime and SM count) and prints their MAPE per regime and SM count. The headline is online:
samples in a shuffled order, each scored before the predictor learns from it (seed 0's order, as
`predictor.py` uses; `--seeds N` adds the mean and spread over N orders). A log (the per-sample lines
`predictor.py` prints) rebuilds a results file when a run's JSON did not come back.

Samples recorded before the `graph` field existed ran decode as a CUDA graph on the whole device
only (partitions ran every step eagerly); `predictor.py` now records it. Times are recomputed from
the batch shapes with the file's profile (the declared H100 profile where the file has none).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.predictor_scoring import (  # noqa: E402
    KINDS, by_kind, by_kind_and_sms, fitted_mape, new_predictor, old_predictor, score_online, score_online_old,
    serving_mape,
)
from controlplane.predictor import PredictorReport  # noqa: E402

LINE = re.compile(r"S=(\d+)\s+(\w+)\s+decode\s+(\d+) x c(\d+)\s+chunks (\[.*?\])\s+measured\s+([\d.]+) ms\s+"
                  r"roofline\s+([\d.]+) ms")


def evaluate(result: dict, seed: int) -> dict[str, object]:
    """Old and new predictors on one shuffled order of the file's samples."""
    samples = [dict(s) for s in result["samples"]]
    old_rec = score_online_old(old_predictor(result), samples, seed, recorded_raw=True) if all(
        "raw_ms" in s for s in samples) else None
    old = score_online_old(old_predictor(result), samples, seed, recorded_raw=False)
    new = score_online(new_predictor(result), samples, seed)
    return {"old_recorded_raw": old_rec, "old": old, "new": new, "samples": samples}


def rescore(path: Path, seed: int, seeds: int) -> int:
    result = json.loads(path.read_text())
    first = evaluate(result, seed)
    samples, new = first["samples"], first["new"]
    print(f"{path}: {len(samples)} samples, {result.get('device', '?')} {result.get('model', '?')}; online MAPE "
          f"(shuffled replay, seed {seed}: each step scored before the predictor learns from it)")
    print(f"{'':34}{'all':>7}" + "".join(f"{k:>9}" for k in KINDS))

    def row(name: str, rep: PredictorReport | None, kinds: dict[str, float | None] | None = None) -> None:
        if rep is None:
            return
        kinds = kinds or {k: (rep.by_regime[k][1] if k in rep.by_regime else None) for k in KINDS}
        print(f"{name:<34}{100 * rep.mape:6.1f}%" + "".join(
            f"{100 * v:8.1f}%" if v is not None else f"{'-':>9}" for v in kinds.values()))

    row("old: recorded roofline + affine", first["old_recorded_raw"])  # type: ignore[arg-type]
    row("old: roofline + affine/regime", first["old"])  # type: ignore[arg-type]
    row("new: launch-aware, keyed", new, by_kind(samples))  # type: ignore[arg-type]
    print(f"new, uncorrected (declared constants): {100 * new.prior_mape:.1f}%; "  # type: ignore[union-attr]
          f"plain roofline: {100 * new.raw_mape:.1f}%")  # type: ignore[union-attr]
    print("new, per kind@SMs:", ", ".join(f"{k} {100 * v:.1f}%" for k, v in by_kind_and_sms(samples).items()))
    n, mape = serving_mape(samples)
    if mape is not None:
        print(f"new, on the {n} shapes serving runs (whole GPU; prefill on a prefill partition; decode graphs "
              f"on a decode partition): {100 * mape:.1f}%")
    if seeds > 1:
        runs = [evaluate(result, s) for s in range(seeds)]
        for name in ("old", "new"):
            m = [r[name].mape for r in runs]  # type: ignore[union-attr]
            print(f"{name} over {seeds} orders: mean {100 * statistics.fmean(m):.1f}%, "
                  f"sd {100 * statistics.pstdev(m):.1f}, min {100 * min(m):.1f}%, max {100 * max(m):.1f}%")
        kinds = [by_kind(r["samples"]) for r in runs]  # type: ignore[arg-type]
        means = {k: [v[k] for v in kinds if v[k] is not None] for k in KINDS}
        serving = [m for _, m in (serving_mape(r["samples"]) for r in runs) if m is not None]  # type: ignore[arg-type]
        print(f"new over {seeds} orders, mean per kind: " + ", ".join(
            f"{k} {100 * statistics.fmean(v):.1f}%" for k, v in means.items() if v)
            + (f"; serving shapes {100 * statistics.fmean(serving):.1f}%" if serving else ""))
    return 0


def from_log(args: argparse.Namespace) -> int:
    samples = []
    for line in Path(args.log).read_text().splitlines():
        m = LINE.search(line)
        if m:
            sms, regime, batch, ctx, chunks, measured, raw = m.groups()
            samples.append({"sms": int(sms), "regime": regime, "batch": int(batch), "decode_context": int(ctx),
                            "chunks": ast.literal_eval(chunks), "measured_ms": float(measured), "raw_ms": float(raw)})
    if not samples:
        raise SystemExit("no sample lines found")
    base = {"device": args.device, "model": "qwen3-8b", "samples": samples}
    report = score_online(new_predictor(base), samples, args.seed)
    result = {
        "summary": {"gpu": args.gpu, "mape": report.mape, "n_samples": report.count, "mape_by_regime": by_kind(samples)},
        "device": args.device, "model": "qwen3-8b", "sm_counts": sorted({s["sms"] for s in samples}),
        "mape_definition": "online: launch-aware roofline, host floors and per-(regime, SM count) corrections "
                           "learnt in a shuffled replay of the samples, each scored before it is learnt from",
        "mape_raw_roofline": report.raw_mape, "mape_uncorrected_model": report.prior_mape,
        "mape_fitted_affine_in_sample": fitted_mape(samples), "note": args.note, "samples": samples,
    }
    out = Path(args.out or ROOT / f"benchmarks/results/predictor-{args.gpu}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1), f"\nraw {report.raw_mape:.3f}", f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log", nargs="?", help="a predictor.py log to rebuild a results file from")
    p.add_argument("--json", type=Path, default=None, help="a results file to re-score (old vs new predictor)")
    p.add_argument("--seeds", type=int, default=1, help="with --json: also average over this many shuffled orders")
    p.add_argument("--gpu", default="h100")
    p.add_argument("--device", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=None, help="log mode: the results file (default benchmarks/results/predictor-<gpu>.json)")
    args = p.parse_args(argv)
    if args.json is not None:
        return rescore(args.json, args.seed, args.seeds)
    if not args.log:
        p.error("give a log file or --json FILE")
    return from_log(args)


if __name__ == "__main__":
    sys.exit(main())
