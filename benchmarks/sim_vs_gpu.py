"""How well `duetserve simulate`'s timing models predict a GPU serving sweep: the goodput and SLO
attainment of each (trace, policy, rate) point of `serving.py` on the GPU next to the same sweep
run by `serving.py --simulate GPU --sim-execution {flashinfer,roofline}` on a CPU.

    python benchmarks/sim_vs_gpu.py --gpu h200      # reads benchmarks/results/serving-{h200,sim-h200-*}.json

Prints a Markdown table and writes it to benchmarks/results/sim-vs-<gpu>.md. Reads files only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXECUTIONS = ("flashinfer", "roofline")


def cell(row: dict | None) -> str:
    return "—" if row is None else f"{row['request_goodput']:.2f} ({100 * row['slo_attainment']:.0f}%)"


def table(real: dict, sims: dict[str, dict]) -> list[str]:
    lines = ["| trace | policy | rate (req/s) | GPU goodput (SLO attainment) | "
             + " | ".join(f"sim `{e}`" for e in sims) + " |", "|---|---|---|---|" + "---|" * len(sims)]
    for trace, by_policy in real.items():
        for policy, rows in by_policy.items():
            for row in rows:
                sim_rows = [next((r for r in s.get(trace, {}).get(policy, []) if r["rate"] == row["rate"]), None)
                            for s in sims.values()]
                lines.append(f"| {trace} | {policy} | {row['rate']:g} | {cell(row)} | "
                             + " | ".join(cell(r) for r in sim_rows) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", default="h200")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    real = json.loads((args.results / f"serving-{args.gpu}.json").read_text())["results"]
    sims = {e: json.loads(f.read_text())["results"] for e in EXECUTIONS
            if (f := args.results / f"serving-sim-{args.gpu}-{e}.json").exists()}
    if not sims:
        raise SystemExit(f"no serving-sim-{args.gpu}-*.json in {args.results}")
    text = "\n".join([f"# Simulated vs measured serving ({args.gpu})", "",
                      "Goodput in req/s under TTFT 2 s / TPOT 50 ms, SLO attainment in brackets; the same "
                      "`benchmarks/serving.py` sweep on the GPU and against the simulated data plane.", "",
                      *table(real, sims), ""])
    out = args.results / f"sim-vs-{args.gpu}.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
