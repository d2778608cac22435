"""How well `duetserve simulate`'s timing models predict a GPU serving sweep: the goodput and SLO
attainment of each (trace, policy, rate) point of `serving.py` on the GPU next to the same sweep
run by `serving.py --simulate GPU --sim-execution {flashinfer,roofline}` on a CPU, and (`--replay`)
by `benchmarks/policy_sim.py`'s virtual-time replay, with the declared launch model and with the
slow-downs measured on the GPU (`--scales`).

    python benchmarks/sim_vs_gpu.py --gpu h200      # reads benchmarks/results/serving-{h200,sim-h200-*}.json
    python benchmarks/sim_vs_gpu.py --gpu h200 --replay --no-sims --trace-dir ../shared/traces

Prints a Markdown table and writes it to benchmarks/results/sim-vs-<gpu>.md. Reads files only (the
replay runs in this process).
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
             + " | ".join(sims) + " |", "|---|---|---|---|" + "---|" * len(sims)]
    for trace, by_policy in real.items():
        for policy, rows in by_policy.items():
            for row in rows:
                sim_rows = [next((r for r in s.get(trace, {}).get(policy, []) if r["rate"] == row["rate"]), None)
                            for s in sims.values()]
                lines.append(f"| {trace} | {policy} | {row['rate']:g} | {cell(row)} | "
                             + " | ".join(cell(r) for r in sim_rows) + " |")
    return lines


def served_with_pieces(config: dict | list) -> bool:
    """Whether a serving sweep's server ran piecewise graphs (sweeps from before they existed did not;
    a merged file lists its inputs' configs, which merge_serving.py keeps alike)."""
    configs = config if isinstance(config, list) else [config]
    return bool(configs) and str(configs[0].get("piecewise_graphs", False)) == "True"


def replay(real: dict, gpu: str, trace_dir: Path, scales: tuple[float, float, float],
           piecewise_graphs: bool = False) -> dict:
    """Every (trace, policy, rate) point of a GPU sweep, replayed with the same requests in virtual time,
    launching passes as that sweep's server did (`piecewise_graphs`)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.policy_sim import TRACES, policy_config, simulate
    from shared.config import SchedulerConfig

    base = SchedulerConfig(tbt_slo_ms=50.0, ttft_slo_ms=2000.0)
    out: dict[str, dict[str, list[dict]]] = {}
    for trace, by_policy in real.items():
        for policy, rows in by_policy.items():
            for row in rows:
                n = row["completed"] + row["failed"]
                metrics, _ = simulate(trace_dir / TRACES[trace], row["rate"], n, policy_config(policy, base), gpu=gpu,
                                      scales=scales, piecewise_graphs=piecewise_graphs)
                out.setdefault(trace, {}).setdefault(policy, []).append({"rate": row["rate"], **metrics})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", default="h200", help="the simulated GPU")
    p.add_argument("--run", default=None, help="the sweep's name in serving-<run>.json (default: --gpu), e.g. "
                                                 "h200-steady-piecewise; writes sim-vs-<run>.md")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--replay", action="store_true", help="add benchmarks/policy_sim.py replays of every point")
    p.add_argument("--no-sims", action="store_true", help="leave out the serving.py --simulate files")
    p.add_argument("--scales", default="1.17,1.44,1.17", help="the replay's measured slow-downs (see policy_sim.py)")
    p.add_argument("--trace-dir", type=Path, default=ROOT.parent / "shared" / "traces")
    args = p.parse_args(argv)
    run = args.run or args.gpu
    report = json.loads((args.results / f"serving-{run}.json").read_text())
    real, pieces = report["results"], served_with_pieces(report.get("config", {}))
    sims = {} if args.no_sims else {
        f"sim `{e}`": json.loads(f.read_text())["results"] for e in EXECUTIONS
        if (f := args.results / f"serving-sim-{run}-{e}.json").exists()}
    if args.replay:
        scales = tuple(float(x) for x in args.scales.split(","))
        sims["replay, declared"] = replay(real, args.gpu, args.trace_dir, (1.0, 1.0, 1.0), pieces)
        sims[f"replay, scales {args.scales}"] = replay(real, args.gpu, args.trace_dir, scales, pieces)  # type: ignore[arg-type]
    if not sims:
        raise SystemExit(f"no serving-sim-{run}-*.json in {args.results} (and no --replay)")
    launches = "piecewise graphs" if pieces else "eager passes"
    text = "\n".join([f"# Simulated vs measured serving ({run}, {launches})", "",
                      "Goodput in req/s under TTFT 2 s / TPOT 50 ms, SLO attainment in brackets; the same "
                      "`benchmarks/serving.py` sweep on the GPU and against the simulated data plane"
                      + (" (`serving.py --simulate`)" if not args.no_sims else "")
                      + ("; `replay` columns: `benchmarks/policy_sim.py` with the same requests, declared "
                         "launch model or slowed by the factors measured on the GPU (eager on the whole "
                         "device, eager on a partition, decode beside a prefill)" if args.replay else "") + ".",
                      "", *table(real, sims), ""])
    out = args.results / f"sim-vs-{run}.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
