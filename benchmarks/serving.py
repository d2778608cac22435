"""Serving benchmark: request-rate sweeps per policy and trace through the real stack (`duetserve serve`
as a process, `duetserve bench serve` logic as the client), goodput under TTFT/TPOT SLOs.

    python benchmarks/serving.py --traces code,conv --policies aggregated,prefill-first,duet --rates 4,8,12
    python benchmarks/serving.py --plot-only benchmarks/results/serving-h100.json   # redraw the plots
    python benchmarks/serving.py --simulate h200 --sim-execution flashinfer ...     # on a CPU

Writes benchmarks/results/serving-<gpu>.json (merged with an existing file, so traces can be run in
separate invocations) and PNG plots next to it. `--simulate GPU` runs the same sweep with the
simulated data plane (`python -m dataplane.sim_worker`, attached to `duetserve serve --attach`)
in real time on a CPU, and writes serving-sim-<gpu>-<execution>.json: the simulator checked
against a GPU run of the same sweep. Each point also keeps its steps (`steps`: per mode, how many,
their mean measured time and a multiplexed step's phases, tokens per step, and the GPU's busy
share), from the server's step counters read before and after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.bench_serve import add_bench_flags, bench  # noqa: E402

TRACES = {"code": "azure_llm_2023_code.csv", "conv": "azure_llm_2023_conv.csv"}
BASELINES = ("aggregated", "prefill-first")  # the baselines; static is reported beside them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`duetserve serve` for one policy (with `--simulate`, attached to a simulated data plane)."""

    def __init__(self, args: argparse.Namespace, policy: str, extra: tuple[str, ...] = ()) -> None:
        """`extra`: more `duetserve serve` flags."""
        self.port, self.metrics = free_port(), free_port()
        self.sim: subprocess.Popen | None = None
        self.workdir: str | None = None
        base = "duet" if policy == "duet-tbt" else policy  # duet-tbt: duet under the paper's per-step rule
        cmd = [sys.executable, "-m", "controlplane.cli", "serve", "--model", args.model, "--port", str(self.port),
               "--policy", base, "--tbt-slo-ms", str(args.tpot_slo_ms), "--ttft-slo-ms", str(args.ttft_slo_ms),
               "--max-num-batched-tokens", str(args.budget), "--max-num-seqs", str(args.max_num_seqs),
               "--metrics-port", str(self.metrics), "--log-level", "WARNING", *extra]
        if not args.piecewise_graphs:
            cmd.append("--no-piecewise-graphs")
        if policy == "duet-tbt":  # the paper's rule: every mixed step fits the TBT SLO, split or not
            cmd += ["--duet-slo", "tbt", "--no-duet-trim"]
        if args.simulate:
            from controlplane.launcher import spawn_sim_dataplane

            self.workdir = tempfile.mkdtemp(prefix="ds-bench-")  # short: ipc paths are limited
            endpoint = f"ipc://{self.workdir}/dp.sock"
            self.sim = spawn_sim_dataplane(endpoint, model=args.model, gpu=args.simulate, time_scale=1.0,
                                           execution=args.sim_execution,
                                           decode_partition_sms=args.decode_partition_sms,
                                           piecewise_graphs=args.piecewise_graphs)
            cmd += ["--attach", "--dataplane-endpoint", endpoint]
        elif args.decode_partition_sms:
            cmd += ["--decode-partition-sms", args.decode_partition_sms]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "serving" not in line:
            self.stop()
            raise RuntimeError(f"server for {policy} did not start: {line!r}")

    def stop(self) -> None:
        for proc in (self.proc, self.sim):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def scrape(metrics_port: int, timeout: float) -> str | None:
    """The server's Prometheus text, or None when the endpoint does not answer."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=timeout).read().decode()
    except OSError:
        return None


def sample_split(metrics_port: int, stop: threading.Event, out: list[tuple[float, float, float]]) -> None:
    """Poll the Prometheus endpoint for the SM split gauges while a run is in progress."""
    t0 = time.monotonic()
    pattern = re.compile(r"^duetserve:sm_split_(prefill|decode)\S*\s+([\d.]+)", re.M)
    while not stop.wait(0.25):
        text = scrape(metrics_port, 1)
        if text is None:
            continue
        values = dict(pattern.findall(text))
        if values:
            out.append((time.monotonic() - t0, float(values.get("prefill", 0)), float(values.get("decode", 0))))


_STEP_COUNTER = re.compile(r'^duetserve:(steps|step_tokens|step_time_milliseconds)_total\{([^}]*)\}\s+([\d.e+-]+)', re.M)


def step_counters(metrics_port: int) -> dict[tuple[str, str, str], float]:
    """The server's step counters now: (counter, mode, phase) -> value (phase "" for steps and tokens)."""
    text = scrape(metrics_port, 2)
    if text is None:
        return {}
    out = {}
    for name, labels, value in _STEP_COUNTER.findall(text):
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(name, attrs.get("mode", ""), attrs.get("phase", ""))] = float(value)
    return out


def step_mix(before: dict[tuple[str, str, str], float], after: dict[tuple[str, str, str], float],
             duration_s: float) -> dict[str, object]:
    """Per mode, what one point's steps were (the counters' growth over the point): how many, their
    mean measured time (and a multiplexed step's phases), tokens per step, and the GPU's busy share."""
    grew = {key: after[key] - before.get(key, 0.0) for key in after}
    modes: dict[str, dict[str, float]] = {}
    for (name, mode, phase), value in grew.items():
        if name == "steps" and value > 0:
            n = value
            row = modes[mode] = {"steps": n, "tokens_per_step": grew.get(("step_tokens", mode, ""), 0.0) / n}
            for ph in ("total", "prefill", "decode"):
                if ("step_time_milliseconds", mode, ph) in grew:
                    row[f"mean_{ph}_ms"] = grew[("step_time_milliseconds", mode, ph)] / n
    busy = sum(grew.get(("step_time_milliseconds", mode, "total"), 0.0) for mode in modes)
    return {"modes": modes, "gpu_busy_fraction": busy / (duration_s * 1e3) if duration_s > 0 else 0.0}


def run_point(args: argparse.Namespace, port: int, metrics: int, trace: Path, rate: float) -> dict:
    p = argparse.ArgumentParser()
    add_bench_flags(p)
    n = int(min(args.max_requests, max(args.min_requests, rate * args.seconds)))
    bargs = p.parse_args(["--address", f"127.0.0.1:{port}", "--trace", str(trace), "--arrival", "trace",
                          "--num-prompts", str(n), "--request-rate", str(rate), "--no-progress",
                          "--goodput", f"ttft:{args.ttft_slo_ms}", f"tpot:{args.tpot_slo_ms}"])
    split: list[tuple[float, float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_split, args=(metrics, stop, split), daemon=True)
    sampler.start()
    counters = step_counters(metrics)
    result = asyncio.run(bench(bargs))
    stop.set()
    sampler.join()
    steps = step_mix(counters, step_counters(metrics), result["duration"])
    keep = ["completed", "failed", "duration", "request_throughput", "request_goodput", "slo_attainment",
            "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms",
            "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
            "mean_e2el_ms", "p99_e2el_ms"]
    row = {k: result[k] for k in keep}
    done = [i for i, (e, o) in enumerate(zip(result["errors"], result["output_lens"])) if not e and o > 0]
    row.update(rate=rate, ttfts=[result["ttfts"][i] for i in done],  # completed requests only (failed: no TTFT)
               tpots=[(result["latencies"][i] - result["ttfts"][i]) / (result["output_lens"][i] - 1)
                      for i in done if result["output_lens"][i] > 1],
               sm_split=split, steps=steps)
    print(f"  rate {rate:5.1f}: goodput {row['request_goodput']:.2f} req/s, attainment {row['slo_attainment']:.0%}, "
          f"TTFT p99 {row['p99_ttft_ms']:.0f} ms, TPOT p99 {row['p99_tpot_ms']:.1f} ms, ITL p99 {row['p99_itl_ms']:.1f} ms",
          flush=True)
    mix = ", ".join(f"{mode} {int(m['steps'])} x {m.get('mean_total_ms', 0):.1f} ms"
                    + (f" (prefill {m['mean_prefill_ms']:.1f}, decode {m['mean_decode_ms']:.1f})"
                       if "mean_prefill_ms" in m else "") + f", {m['tokens_per_step']:.0f} tok"
                    for mode, m in steps["modes"].items())  # type: ignore[union-attr]
    print(f"    steps: {mix or 'none seen'}; GPU busy {steps['gpu_busy_fraction']:.0%}", flush=True)
    return row


def summarise(results: dict) -> dict:
    """Per trace: at the lowest rate where the best baseline's SLO attainment drops below 90%
    (`knee_found`; false: no swept rate got there, and the row is the highest rate swept).

    Beside the goodputs, each policy's attainment there and `goodput_ratio_ceiling`: duet's request
    throughput over the baseline's goodput, the ratio duet would reach with every request inside its
    SLOs (goodput never exceeds the rate requests complete at, about the same for every policy; null
    when the baseline's goodput is 0). The p99 TBT is vLLM's p99 ITL: one gap per streamed message."""
    out = {}
    for trace, by_policy in results.items():
        if "duet" not in by_policy:
            continue
        base = [p for p in by_policy if p in BASELINES]
        if not base:  # only duet so far (the sweep writes after each policy)
            continue
        rates = sorted({r["rate"] for r in by_policy["duet"]} & set.intersection(
            *({r["rate"] for r in by_policy[p]} for p in base)))
        if not rates:
            continue

        def at(policy: str, rate: float) -> dict:
            return next(r for r in by_policy[policy] if r["rate"] == rate)

        knee = next((rate for rate in rates if max(at(p, rate)["slo_attainment"] for p in base) < 0.9), None)
        chosen = rates[-1] if knee is None else knee
        best = max(base, key=lambda p: at(p, chosen)["request_goodput"])
        duet, baseline = at("duet", chosen), at(best, chosen)
        out[f"azure_{trace}"] = {
            "duet_goodput": duet["request_goodput"], "best_baseline_goodput": baseline["request_goodput"],
            "best_baseline": best, "rate": chosen, "knee_found": knee is not None,
            "duet_p99_tbt_ms": duet["p99_itl_ms"],
            "baseline_p99_tbt_ms": baseline["p99_itl_ms"],
            "duet_slo_attainment": duet["slo_attainment"], "baseline_slo_attainment": baseline["slo_attainment"],
            "goodput_ratio_ceiling": duet["request_throughput"] / baseline["request_goodput"]
            if baseline["request_goodput"] else None,
        }
        for other in ("static", "duet-tbt"):
            row = next((r for r in by_policy.get(other, []) if r["rate"] == chosen), None)
            if row is not None:
                out[f"azure_{trace}"][f"{other.replace('-', '_')}_goodput"] = row["request_goodput"]
    return out


def plot(report: dict, out_dir: Path, gpu: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for trace, by_policy in report["results"].items():
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
        for policy, rows in by_policy.items():
            rows = sorted(rows, key=lambda r: r["rate"])
            axes[0].plot([r["rate"] for r in rows], [r["request_goodput"] for r in rows], "o-", label=policy)
            axes[1].plot([r["rate"] for r in rows], [r["p99_itl_ms"] for r in rows], "o-", label=policy)
            mid = rows[len(rows) // 2]
            for ax, key in ((axes[2], "ttfts"), (axes[3], "tpots")):
                xs = sorted(v * 1e3 for v in mid[key])
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{policy} @ {mid['rate']:g} req/s")
        axes[0].set(xlabel="request rate (req/s)", ylabel="goodput (req/s)", title=f"azure {trace}: goodput")
        axes[1].set(xlabel="request rate (req/s)", ylabel="p99 inter-token latency (ms)", title="p99 TBT")
        axes[2].set(xlabel="TTFT (ms)", ylabel="CDF", title="TTFT CDF", xscale="log")
        axes[3].set(xlabel="TPOT (ms)", ylabel="CDF", title="TPOT CDF")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"serving-{gpu}-{trace}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        duet = by_policy.get("duet")
        if duet:
            fig, ax = plt.subplots(figsize=(9, 3.5))
            for row in sorted(duet, key=lambda r: r["rate"]):
                if row["sm_split"]:
                    ts, _, dec = zip(*row["sm_split"])
                    ax.step(ts, dec, where="post", label=f"{row['rate']:g} req/s")
            ax.set(xlabel="time (s)", ylabel="decode SMs (0: aggregated)", title=f"duet SM split over time, azure {trace}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"serving-{gpu}-{trace}-split.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--traces", default="code,conv")
    p.add_argument("--trace-dir", type=Path, default=ROOT.parent / "shared" / "traces")
    p.add_argument("--policies", default="aggregated,prefill-first,duet")
    p.add_argument("--rates", default="4,8,12")
    p.add_argument("--seconds", type=float, default=25.0, help="trace time per rate point")
    p.add_argument("--min-requests", type=int, default=60)
    p.add_argument("--max-requests", type=int, default=300)
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    p.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens for every policy")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="serve with piecewise CUDA graphs for prefill and mixed steps, the server's default "
                        "(--no-piecewise-graphs: eager; name the run with --gpu)")
    p.add_argument("--decode-partition-sms", default="16,24,32,48,64")
    p.add_argument("--gpu", default="h100", help="the GPU's name in the results file")
    p.add_argument("--simulate", default=None, metavar="GPU",
                   help="run against the simulated data plane of this GPU (h100, h200) instead of a real one")
    p.add_argument("--sim-execution", default="flashinfer", choices=("roofline", "flashinfer"),
                   help="with --simulate: the simulated plane's timing model (default flashinfer)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--plot-only", type=Path, default=None)
    args = p.parse_args()
    if args.plot_only:
        report = json.loads(args.plot_only.read_text())
        print(plot(report, args.plot_only.parent, report["summary"].get("gpu", args.gpu)))
        return
    gpu = f"sim-{args.simulate}-{args.sim_execution}" if args.simulate else args.gpu
    path = args.out / f"serving-{gpu}.json"
    report = json.loads(path.read_text()) if path.exists() else {"results": {}}
    rates = [float(r) for r in args.rates.split(",")]
    for trace in args.traces.split(","):
        for policy in args.policies.split(","):
            print(f"{trace} / {policy}", flush=True)
            server = Server(args, policy)
            try:
                rows = [run_point(args, server.port, server.metrics, args.trace_dir / TRACES[trace], rate)
                        for rate in rates]
            finally:
                server.stop()
            report["results"].setdefault(trace, {})[policy] = rows
            args.out.mkdir(parents=True, exist_ok=True)
            report["summary"] = {"gpu": gpu, **summarise(report["results"])}
            report["config"] = {k: str(v) for k, v in vars(args).items()}
            path.write_text(json.dumps(report) + "\n")
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
