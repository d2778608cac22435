"""Virtual-time replay of a trace through the real scheduler and the simulated GPU's timing model:
one process, no sockets, no sleeping, deterministic -- a policy sweep in seconds on a busy CPU.

    python benchmarks/policy_sim.py --trace conv --rates 12,20,28 --policies duet,duet-tbt,aggregated

Each step costs what `dataplane.sim_worker.SimGpu` says (the declared profile of `--gpu` and its
launch model), runs in order on one simulated GPU stream, and is planned `--host-ms` after the
scheduler could plan it; with async scheduling two steps are in flight, as in the engine. A
multiplexed step's look-ahead tokens reach the client as each pass ends (StepProgress), the rest
at the step's end. Metrics are `duetserve bench serve`'s, computed by the same code from the same
per-request arrays. What it leaves out: the control plane's real host time, noise, HBM contention
between partitions (see benchmarks/results/sim-vs-h200.md for how the simulator compares with the GPU).
It decides nothing: it drives the scheduler and reports.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.bench_serve import Goodput, arrivals, compute_metrics, per_request  # noqa: E402
from controlplane.prefix_cache import make_allocator  # noqa: E402
from controlplane.replay import RequestRecord, load_trace  # noqa: E402
from controlplane.scheduler import Scheduler  # noqa: E402
from controlplane.sequence import Sequence, StopParams  # noqa: E402
from controlplane.step_records import SeqUpdate  # noqa: E402
from dataplane.sim_worker import SimGpu, sim_ready  # noqa: E402
from shared.config import SchedulerConfig  # noqa: E402
from shared.messages import SamplingParams, StepProgress  # noqa: E402

TRACES = {"code": "azure_llm_2023_code.csv", "conv": "azure_llm_2023_conv.csv"}


def policy_config(policy: str, base: SchedulerConfig) -> SchedulerConfig:
    """`duet-tbt` is duet under the paper's rule (every mixed step fits the TBT SLO, split or not),
    `duet-notrim` without the trimmed-chunk candidate; other names are SchedulerConfig policies."""
    import msgspec

    if policy == "duet-tbt":
        return msgspec.structs.replace(base, policy="duet", duet_slo="tbt", duet_trim=False)
    if policy == "duet-notrim":
        return msgspec.structs.replace(base, policy="duet", duet_trim=False)
    return msgspec.structs.replace(base, policy=policy)  # type: ignore[arg-type]


def slowed(gpu_model: SimGpu, eager_scale: float, partition_scale: float, isolation: float) -> None:
    """Scale the simulated GPU's pass times the way a GPU run departs from the declared model: eager
    (chunked) passes on the whole device by `eager_scale`, on a partition by `partition_scale`, decode
    passes on a partition (beside a prefill, sharing HBM) by `isolation`. The factors were measured
    on eager passes; a piecewise pass on the whole device is scaled by `eager_scale` too, its host
    floor included (they run the same kernels)."""
    full, base = gpu_model.ready.device.sm_count, gpu_model._ms

    def ms(cost, sms):  # noqa: ANN001, ANN202
        t = base(cost, sms)
        on_partition = sms is not None and sms < full
        if cost.ragged:
            return t * (partition_scale if on_partition else eager_scale)
        return t * isolation if on_partition else t

    gpu_model._ms = ms  # type: ignore[method-assign]


class _Replay:
    """The discrete-event loop: arrivals, and each planned step's progress and result at the simulated
    GPU's times; a step is planned `host_ms` after the scheduler could plan it, in order on one stream."""

    def __init__(self, sched: Scheduler, gpu_model: SimGpu, records: list[RequestRecord], host_ms: float) -> None:
        self.sched, self.gpu_model, self.records, self.host_ms = sched, gpu_model, records, host_ms
        self.vocab = gpu_model.ready.model.vocab_size
        self.events: list[tuple[float, int, object]] = []  # (time s, order, payload)
        self.order = 0
        self.now = 0.0
        self.gpu_free = 0.0
        sched.slo_clock = lambda: self.now
        for i, record in enumerate(records):
            self.push(record.sent, ("arrive", i))

    def push(self, t: float, payload: object) -> None:
        heapq.heappush(self.events, (t, self.order, payload))
        self.order += 1

    def apply(self, updates: list[SeqUpdate]) -> None:
        for u in updates:
            rec = self.records[u.seq.seq_id]
            if u.new_token_ids:
                rec.chunks.append((self.now, len(u.new_token_ids)))
                rec.completion_tokens += len(u.new_token_ids)
            if u.finished:
                rec.finish_reason = "length"
                rec.cached_tokens = u.seq.num_cached_tokens

    def arrive(self, i: int) -> None:
        """Request i's sequence, with a prompt of its own: no two requests share a first block, so the
        prefix cache never hits, as with the random prompts of a GPU sweep."""
        rec, vocab = self.records[i], self.vocab
        self.sched.add(Sequence(seq_id=i, request_id=str(i),
                                prompt_token_ids=[16 + (i * 7919 + j) % (vocab - 16) for j in range(rec.prompt_tokens)],
                                sampling=SamplingParams(temperature=0.0),
                                stop=StopParams(max_tokens=rec.max_tokens, ignore_eos=True), arrival_time=self.now))

    def plan(self) -> None:
        """Plan steps while there is room in flight and work to do; their messages become events."""
        sched = self.sched
        while len(sched.inflight) < sched.max_inflight and sched.has_work():
            plan = sched.schedule()
            if plan is None:
                return
            self.gpu_free, messages = self.gpu_model.run_at(plan, max(self.now + self.host_ms / 1e3, self.gpu_free),
                                                            1e-3)
            for due, message in messages:
                self.push(due, ("progress" if isinstance(message, StepProgress) else "result", message))

    def run(self) -> None:
        while self.events:
            self.now, _, payload = heapq.heappop(self.events)
            kind, value = payload  # type: ignore[misc]
            if kind == "arrive":
                self.arrive(value)
            elif kind == "progress":
                self.apply(self.sched.progress(value))
            else:
                self.apply(self.sched.update(value))
            self.plan()


def _sim_gpu(gpu: str, execution: str, decode_partition_sms: list[int] | None, piecewise_graphs: bool,
             piecewise_host_ms: float | None, scales: tuple[float, float, float]) -> SimGpu:
    ready = sim_ready("qwen3-8b", gpu, execution=execution, decode_partition_sms=decode_partition_sms,
                      piecewise_graphs=piecewise_graphs)
    gpu_model = SimGpu(ready, time_scale=0.0)
    if piecewise_host_ms is not None:
        gpu_model.roofline.piecewise_floor_ms = piecewise_host_ms
    if scales != (1.0, 1.0, 1.0):
        slowed(gpu_model, *scales)
    return gpu_model


def simulate(trace: Path, rate: float, num_requests: int, config: SchedulerConfig, *, gpu: str = "h200",
             execution: str = "flashinfer", host_ms: float = 1.0, decode_partition_sms: list[int] | None = None,
             scales: tuple[float, float, float] = (1.0, 1.0, 1.0), piecewise_graphs: bool = True,
             piecewise_host_ms: float | None = None) -> tuple[dict[str, object], Scheduler]:
    """Replay `num_requests` of `trace` at `rate` req/s; returns bench-serve's metrics and per-request
    arrays (as `duetserve bench serve` writes them), and the scheduler.
    `scales`: (eager, partition, isolation) factors, see `slowed`; `piecewise_graphs`: passes of up to
    1024 tokens on the whole device launch as piecewise graphs (the data plane's default), whose host
    floor `piecewise_host_ms` replaces the declared one (a what-if)."""
    workload = load_trace(trace, limit=num_requests)
    send = arrivals(workload, "trace", rate, 1.0, 0)
    gpu_model = _sim_gpu(gpu, execution, decode_partition_sms, piecewise_graphs, piecewise_host_ms, scales)
    ready = gpu_model.ready
    allocator = make_allocator(ready.num_kv_blocks, ready.block_size, config.enable_prefix_caching)
    sched = Scheduler(config, allocator, ready.max_model_len, frozenset(ready.model.eos_token_ids), ready)
    records = []
    for i, (req, at) in enumerate(zip(workload, send)):
        max_tokens = max(1, min(req.output_tokens, ready.max_model_len - 1))
        prompt = max(1, min(req.prompt_tokens, ready.max_model_len - max_tokens))
        records.append(RequestRecord(i, prompt, max_tokens, sent=at))
    _Replay(sched, gpu_model, records, host_ms).run()
    duration = max((r.chunks[-1][0] for r in records if r.chunks), default=0.0) - min(send)
    arrays = per_request(records)
    goodput = Goodput(ttft_ms=config.ttft_slo_ms, tpot_ms=config.tbt_slo_ms)
    return {**compute_metrics(arrays, duration, goodput), **arrays}, sched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default="conv", help="code, conv or a CSV path")
    p.add_argument("--trace-dir", type=Path, default=ROOT.parent / "shared" / "traces")
    p.add_argument("--rates", default="12,20,28")
    p.add_argument("--policies", default="duet,duet-tbt,aggregated,prefill-first")
    p.add_argument("--seconds", type=float, default=15.0, help="trace time per rate point")
    p.add_argument("--min-requests", type=int, default=60)
    p.add_argument("--max-requests", type=int, default=300)
    p.add_argument("--gpu", default="h200")
    p.add_argument("--execution", default="flashinfer", choices=("flashinfer", "roofline"))
    p.add_argument("--host-ms", type=float, default=1.0)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    p.add_argument("--tpot-horizon", type=int, default=SchedulerConfig().tpot_horizon)
    p.add_argument("--decode-partition-sms", default="16,24,32,48,64")
    p.add_argument("--scales", default="1,1,1", metavar="EAGER,PARTITION,ISOLATION",
                   help="slow the declared model down like a GPU run: eager passes on the whole device, eager "
                        "passes on a partition, decode on a partition beside a prefill (H200 measured about "
                        "1.17,1.44,1.17: benchmarks/results/sim-vs-h200.md, multiplex-h200.json)")
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="passes of up to 1024 tokens on the whole device launch as piecewise graphs, as the data "
                        "plane's do by default (--no-piecewise-graphs: every prefill and mixed pass eager, as "
                        "the GPU runs before 5a47025 were)")
    p.add_argument("--piecewise-host-ms", type=float, default=None,
                   help="what-if: piecewise passes wait this long on the host instead of the declared floor")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    trace = Path(args.trace) if args.trace not in TRACES else args.trace_dir / TRACES[args.trace]
    base = SchedulerConfig(max_num_batched_tokens=args.budget, tbt_slo_ms=args.tpot_slo_ms,
                           ttft_slo_ms=args.ttft_slo_ms, tpot_horizon=args.tpot_horizon)
    sizes = [int(x) for x in args.decode_partition_sms.split(",")] if args.decode_partition_sms else None
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        n = int(min(args.max_requests, max(args.min_requests, rate * args.seconds)))
        for policy in args.policies.split(","):
            m, sched = simulate(trace, rate, n, policy_config(policy, base), gpu=args.gpu,
                                execution=args.execution, host_ms=args.host_ms, decode_partition_sms=sizes,
                                scales=tuple(float(x) for x in args.scales.split(",")),  # type: ignore[arg-type]
                                piecewise_graphs=args.piecewise_graphs, piecewise_host_ms=args.piecewise_host_ms)
            summary = sched.stats.summary()
            steps = {**summary.get("steps", {}), "trimmed": summary.get("trimmed_steps", 0)}
            rows.append({"policy": policy, "rate": rate, **{k: v for k, v in m.items() if not isinstance(v, list)},
                         "steps": steps})
            print(f"{policy:>13} @ {rate:5.1f}: goodput {m['request_goodput']:6.2f} req/s ({m['slo_attainment']:4.0%})"
                  f"  TTFT p99 {m['p99_ttft_ms']:7.0f} ms  TPOT p99 {m['p99_tpot_ms']:6.1f} ms"
                  f"  ITL p99 {m['p99_itl_ms']:6.1f} ms  steps {steps}", flush=True)
    if args.json:  # each row says how its passes were launched
        launch = {"piecewise_graphs": args.piecewise_graphs, "piecewise_host_ms": args.piecewise_host_ms,
                  "scales": args.scales}
        args.json.write_text(json.dumps([{**row, **launch} for row in rows], indent=1))


if __name__ == "__main__":
    main()
