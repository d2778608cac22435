"""Merge serving sweeps run in separate device calls into one results file, with the summary
`benchmarks/serving.py` writes. Rows are kept per (trace, policy, rate): a later file's row at a
rate replaces an earlier one's at that rate, and rates swept in different calls add up. Sweeps whose
servers launched passes differently (piecewise graphs or eager) are refused.

    python benchmarks/merge_serving.py OUT.json IN1.json IN2.json ... [--gpu h200] [--note TEXT]

Reads and writes JSON only; draw the plots afterwards with `serving.py --plot-only OUT.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import summarise  # noqa: E402


def merge(reports: list[dict], gpu: str, note: str = "") -> dict:
    results: dict[str, dict] = {}
    configs = []
    for report in reports:
        for trace, by_policy in report["results"].items():
            for policy, rows in by_policy.items():
                kept = results.setdefault(trace, {}).setdefault(policy, [])
                new_rates = {r["rate"] for r in rows}
                kept[:] = sorted([r for r in kept if r["rate"] not in new_rates] + rows, key=lambda r: r["rate"])
        config = report.get("config", {})
        configs += config if isinstance(config, list) else [config]
    launches = {str(c.get("piecewise_graphs", False)) for c in configs}  # absent: before the pieces, eager
    if len(launches) > 1:
        raise ValueError("these sweeps launched prefill and mixed passes differently (piecewise graphs in some, "
                         "eager in others): merge like with like")
    merged = {"results": results, "summary": {"gpu": gpu, **summarise(results)}, "config": configs}
    if note:
        merged["note"] = note
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("inputs", type=Path, nargs="+")
    p.add_argument("--gpu", default="h200")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    merged = merge([json.loads(f.read_text()) for f in args.inputs], args.gpu, args.note)
    args.out.write_text(json.dumps(merged) + "\n")
    print(json.dumps(merged["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
