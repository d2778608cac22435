"""How many output tokens a second the control plane streams through gRPC, and its CPU per token:
the simulated data plane (`dataplane.sim_worker`, a named GPU's roofline: `--time-scale 1` runs its
predicted step times, smaller is faster; no GPU limit at small scales) or, with `--gpu cuda`, the
real one on that device serves `--model` (Qwen3-8B shapes by default), and `duetserve bench serve` (another
process) keeps `--concurrency` streams open, all at once.

Each point starts a control plane from a checkout (`--roots`: this one by default; an older one, e.g.
a `git worktree` of an earlier commit, measures what a change bought) and reads that process's own
CPU time (utime + stime, not the data plane's or the client's). Prints a table and writes
benchmarks/results/stream-throughput-cpu.json.

    python benchmarks/stream_throughput.py [--roots .,/tmp/old] [--concurrency 64,256]
        [--stream-intervals 1,4] [--time-scale 1.0] [--num-prompts 512] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from controlplane.launcher import stop_process  # noqa: E402

SERVER = """
import asyncio, json, signal, sys, tempfile
from controlplane.launcher import spawn_dataplane, spawn_sim_dataplane, stop_process
from controlplane.server import ControlPlane
from shared.config import DataplaneConfig, SchedulerConfig, ServerConfig
port, scale, gpu, interval, model = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
# an optional sixth: the SchedulerConfig fields as JSON (aggregated unless it says otherwise)
scheduler = {"policy": "aggregated", **(json.loads(sys.argv[6]) if len(sys.argv) > 6 else {})}
async def main():
    workdir = tempfile.mkdtemp(prefix="st-")
    endpoint = f"ipc://{workdir}/dp.sock"
    if gpu in ("cuda", "cpu"):  # the real data plane on that device, its defaults
        child = spawn_dataplane(DataplaneConfig(model=model, endpoint=endpoint, device=gpu), "WARNING")
    else:
        child = spawn_sim_dataplane(endpoint, model=model, gpu=gpu, time_scale=scale)
    extra = {"stream_interval": interval} if interval != 1 else {}
    plane = ControlPlane(ServerConfig(port=port, dataplane_endpoint=endpoint, handshake_timeout_s=600,
                                      scheduler=SchedulerConfig(**scheduler), **extra), model)
    await plane.start()
    stop = asyncio.Event()  # SIGTERM ends the server the way Ctrl-C would: its data plane stopped too
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", plane.port, flush=True)
    try:
        await stop.wait()
    finally:
        await plane.stop()
        stop_process(child)
asyncio.run(main())
"""


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _commit(root: Path) -> str:
    """The checkout's commit, `+` when it has uncommitted changes."""
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+" if dirty else "")


def server_env(root: Path, environ: dict[str, str]) -> dict[str, str]:
    """The control plane's environment: `root`'s code first on the path, then what the path held (where the
    dependencies may be: on the GPU machine they are installed under a folder PYTHONPATH names)."""
    inherited = [entry for entry in environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return {**environ, "PYTHONPATH": os.pathsep.join([str(root), *inherited])}


def _tail(errors: IO[str]) -> str:
    errors.seek(0)
    return " | ".join(errors.read().strip().splitlines()[-3:]) or "no error output"


def start_server(root: Path, code: str, argv: list[str], errors: IO[str]) -> tuple[subprocess.Popen, int]:
    """A control plane from `root` running `code` (SERVER or a variant) with `argv`, and the port it bound (0
    asks for a free one); its stderr goes to `errors`. One that does not start is stopped, and a
    RuntimeError gives its stderr's last lines."""
    server = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=root, env=server_env(root, dict(os.environ)),
                              stdout=subprocess.PIPE, stderr=errors, text=True)
    assert server.stdout is not None
    ready = server.stdout.readline().split()
    if len(ready) != 2 or ready[0] != "ready":
        stop_process(server, 30.0, "the control plane")
        raise RuntimeError(f"the control plane of {root} did not start ({_tail(errors)})")
    return server, int(ready[1])


def run_point(root: Path, port: int, concurrency: int, interval: int, args: argparse.Namespace) -> dict[str, object]:
    # the server's stderr, on disk (a pipe nobody reads could fill): its last lines say why it failed
    with tempfile.TemporaryFile(mode="w+", errors="replace") as errors:
        server, port = start_server(root, SERVER, [str(port), str(args.time_scale), args.gpu, str(interval),
                                                   args.model], errors)
        try:
            with tempfile.NamedTemporaryFile(suffix=".json") as result:
                cpu0 = _cpu_s(server.pid)
                bench_run = subprocess.run(
                    [sys.executable, "-m", "controlplane.cli", "bench", "serve", "--address", f"127.0.0.1:{port}",
                     "--dataset", "random", "--num-prompts", str(args.num_prompts), "--random-input-len", "64",
                     "--random-output-len", str(args.output_len), "--max-concurrency", str(concurrency),
                     "--no-progress", "--result-file", result.name],
                    cwd=ROOT, stdout=subprocess.DEVNULL)
                cpu = _cpu_s(server.pid) - cpu0
                if bench_run.returncode != 0:
                    raise RuntimeError(f"bench serve against the control plane of {root} exited "
                                       f"{bench_run.returncode} (the server's stderr: {_tail(errors)})")
                bench = json.loads(Path(result.name).read_text())
        finally:  # SIGTERM: the server stops its data plane too
            stop_process(server, 30.0, "the control plane")
    tokens = bench["total_output_tokens"]
    return {"root": str(root), "commit": _commit(root), "concurrency": concurrency, "stream_interval": interval,
            "output_tok_s": bench["output_throughput"], "mean_tpot_ms": bench["mean_tpot_ms"],
            "mean_ttft_ms": bench["mean_ttft_ms"], "completed": bench["completed"], "failed": bench["failed"],
            "server_cpu_s": cpu, "server_cpu_us_per_token": cpu / tokens * 1e6 if tokens else None,
            "duration_s": bench["duration"]}


def _summary(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The median of each point's rounds."""
    groups: dict[tuple, list[dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((row["commit"], row["concurrency"], row["stream_interval"]), []).append(row)
    return [{"commit": c, "concurrency": n, "stream_interval": i, "rounds": len(g),
             "median_output_tok_s": statistics.median(float(r["output_tok_s"]) for r in g),  # type: ignore[arg-type]
             "median_server_cpu_us_per_token": statistics.median(float(r["server_cpu_us_per_token"])  # type: ignore[arg-type]
                                                                 for r in g)}
            for (c, n, i), g in groups.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", default=str(ROOT), help="comma-separated checkouts whose control plane serves")
    parser.add_argument("--concurrency", default="64,256")
    parser.add_argument("--stream-intervals", default="1", help="comma-separated; > 1 only for roots that have it")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--gpu", default="h200",
                        help="the simulated GPU, or cuda / cpu: the real data plane on that device (--time-scale "
                             "is then ignored)")
    parser.add_argument("--model", default="qwen3-8b", help="preset (random weights) or checkpoint folder")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over every point (the roots alternate)")
    parser.add_argument("--port", type=int, default=0, help="the control plane's gRPC port (0: a free one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/stream-throughput-cpu.json (simulated) or -cuda.json")
    args = parser.parse_args()
    kind = {"cuda": "cuda", "cpu": "cpu-real"}.get(args.gpu, "cpu")
    args.out = args.out or ROOT / "benchmarks" / "results" / f"stream-throughput-{kind}.json"
    rows: list[dict[str, object]] = []
    points = [(Path(r).resolve(), int(c), int(i)) for _ in range(args.repeat) for c in args.concurrency.split(",")
              for i in args.stream_intervals.split(",") for r in args.roots.split(",")]
    for n, (root, concurrency, interval) in enumerate(points):
        try:
            row = run_point(root, args.port + n, concurrency, interval, args)
        except RuntimeError as exc:  # e.g. an older checkout without --stream-interval
            print(f"skipped: {exc} (streams {concurrency}, interval {interval})")
            continue
        rows.append(row)
        print(f"{row['commit']:>9}  streams {concurrency:>4}  interval {interval}  "
              f"{row['output_tok_s']:>8.0f} output tok/s  TPOT {row['mean_tpot_ms']:6.1f} ms  "
              f"server CPU {row['server_cpu_us_per_token']:5.1f} us/token", flush=True)
    result = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "time_scale": args.time_scale, "gpu": args.gpu, "model": args.model, "num_prompts": args.num_prompts,
              "output_len": args.output_len, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "summary": _summary(rows), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
