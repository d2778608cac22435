"""The control plane's latency predictor: a launch-aware roofline, corrected online by measured step times.

Model of one step on S SMs (`shared.roofline`, constants from the worker's HardwareProfile and the
declared `ExecutionProfile`):

    device = roofline (ragged-kernel tiles included) + kernels * kernel_us (+ pre-replay host time)
    t      = max(a + b * device, floor)     an eager step: the host must launch it op by op
    t      = a + b * device                 a decode step replayed as a CUDA graph

`a + b * device` is an exponentially-forgetting least-squares fit per (regime, SM-count bucket),
pulled towards `a = 0, b = 1` until data arrives, with outliers clipped to 4x the current
prediction once it has a few samples; a key with fewer than `min_key_samples` fits falls back to
the regime's pooled fit (and a multiplexed phase to its aggregated twin's). `floor` is learnt per
(launch path, SM bucket) -- eager decode kernel or eager ragged kernel; a small partition runs the
many small kernels of an eager step slower -- starting from the declared host-launch time, with
the same fallback to the path's pooled floor: a measurement whose device prediction lies below the
floor is floor-bound and moves the floor, any other moves the device fit (and the floor too, if
it came in under it). Every observation is
first scored against the prediction made before it (absolute percentage error), so `report()` is
an honest running MAPE, per regime and per (regime, SM bucket); it also scores the plain
roofline of DESIGN.md (`raw`) and the uncorrected launch-aware model (`prior`) on the same steps.
Pure: no I/O, no torch, no scheduling decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.messages import HardwareProfile, ModelDescription
from shared.profiles import ExecutionProfile
from shared.roofline import BatchCost, ModelShape, Roofline, batch_cost

Regime = Literal["decode", "prefill", "mixed", "mux_decode", "mux_prefill"]
REGIMES: tuple[Regime, ...] = ("decode", "prefill", "mixed", "mux_decode", "mux_prefill")
# A multiplexed phase borrows its aggregated twin's correction until it has data of its own.
_FALLBACK: dict[Regime, Regime] = {"mux_decode": "decode", "mux_prefill": "prefill"}
# Decode-only steps replay CUDA graphs (aggregated on the whole device, multiplexed on a partition).
GRAPH_REGIMES: frozenset[str] = frozenset({"decode", "mux_decode"})
Path = Literal["graph", "eager-decode", "eager-ragged"]


def regime_of(num_decode: int, num_other: int) -> Regime:
    """decode-only, prefill-only (no decode item) or mixed."""
    if num_other == 0:
        return "decode"
    return "prefill" if num_decode == 0 else "mixed"


@dataclass(frozen=True)
class StepEstimate:
    """One step's shape-derived times: what the predictor corrects and learns from.

    `path` says how the step is launched: "graph" (no host floor) or eagerly through the decode or
    the ragged attention kernel (each its own host floor). `roofline_ms` is the plain roofline,
    kept to report its error next to the model's (0 when not asked for)."""

    device_ms: float
    path: Path
    sms: int
    roofline_ms: float = 0.0

    @property
    def eager(self) -> bool:
        return self.path != "graph"


@dataclass
class Correction:
    """Online fit of measured = a + b * raw with forgetting factor `forget` and a ridge prior."""

    forget: float = 0.95
    prior_weight: float = 0.25
    warmup: float = 5.0
    outlier_ratio: float = 4.0
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    scale_sq: float = 0.0  # typical raw^2: sets the prior's strength on b in the data's units
    a: float = 0.0
    b: float = 1.0
    count: int = 0  # observations learnt from

    def apply(self, raw_ms: float) -> float:
        return max(self.a + self.b * raw_ms, 0.1 * raw_ms, 0.0)

    def update(self, raw_ms: float, measured_ms: float) -> None:
        if self.n >= self.warmup:  # an outlier (a GC pause, a preempted host) moves the fit 4x at most
            predicted = self.apply(raw_ms)
            measured_ms = min(max(measured_ms, predicted / self.outlier_ratio), predicted * self.outlier_ratio)
        lam = self.forget
        self.count += 1
        self.n = lam * self.n + 1.0
        self.sx = lam * self.sx + raw_ms
        self.sy = lam * self.sy + measured_ms
        self.sxx = lam * self.sxx + raw_ms * raw_ms
        self.sxy = lam * self.sxy + raw_ms * measured_ms
        if self.scale_sq == 0.0:
            self.scale_sq = max(raw_ms * raw_ms, 1e-9)
        # Minimise sum w (y - a - b x)^2 + pa a^2 + pb (b - 1)^2: a 2x2 linear system.
        pa, pb = self.prior_weight, self.prior_weight * self.scale_sq
        m00, m01, m11 = self.n + pa, self.sx, self.sxx + pb
        r0, r1 = self.sy, self.sxy + pb
        det = m00 * m11 - m01 * m01
        if det <= 0.0:
            return
        a = (r0 * m11 - m01 * r1) / det
        b = (m00 * r1 - m01 * r0) / det
        if b <= 0.0:  # a fit that says "slower batches run faster" is noise: keep the scale only
            b, a = max(self.sy, 1e-9) / max(self.sx, 1e-9), 0.0
        self.a, self.b = a, b


@dataclass
class HostFloor:
    """The host-launch floor of eager steps on one launch path: a forgetting mean of floor-bound
    measurements, starting from the declared prior (worth `prior_weight` observations)."""

    prior_ms: float
    forget: float = 0.95
    prior_weight: float = 0.5
    warmup: int = 5
    outlier_ratio: float = 4.0
    n: float = 0.0
    total: float = 0.0
    count: int = 0

    @property
    def value(self) -> float:
        return (self.prior_weight * self.prior_ms + self.total) / (self.prior_weight + self.n)

    def update(self, measured_ms: float) -> None:
        if self.count >= self.warmup:
            v = self.value
            measured_ms = min(max(measured_ms, v / self.outlier_ratio), v * self.outlier_ratio)
        self.count += 1
        self.n = self.forget * self.n + 1.0
        self.total = self.forget * self.total + measured_ms


@dataclass
class ErrorStats:
    count: int = 0
    sum_ape: float = 0.0
    sum_raw_ape: float = 0.0
    sum_prior_ape: float = 0.0

    def _mean(self, total: float) -> float:
        return total / self.count if self.count else 0.0

    @property
    def mape(self) -> float:
        return self._mean(self.sum_ape)

    @property
    def raw_mape(self) -> float:
        return self._mean(self.sum_raw_ape)

    @property
    def prior_mape(self) -> float:
        return self._mean(self.sum_prior_ape)

    def add(self, predicted: float, raw: float, prior: float, measured: float) -> None:
        self.count += 1
        self.sum_ape += abs(predicted - measured) / measured
        self.sum_raw_ape += abs(raw - measured) / measured
        self.sum_prior_ape += abs(prior - measured) / measured


@dataclass(frozen=True)
class PredictorReport:
    """Running error of the predictor: corrected MAPE, the plain roofline's and the uncorrected
    model's (declared constants), overall, per regime and per (regime, SM count)."""

    count: int
    mape: float
    raw_mape: float
    by_regime: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # n, mape, raw mape
    prior_mape: float = 0.0
    by_key: dict[str, tuple[int, float]] = field(default_factory=dict)  # "regime@S": n, mape

    def as_dict(self) -> dict[str, object]:
        return {
            "n_samples": self.count, "mape": self.mape, "mape_raw_roofline": self.raw_mape,
            "mape_uncorrected_model": self.prior_mape,
            "by_regime": {k: {"n": n, "mape": m, "mape_raw_roofline": r} for k, (n, m, r) in self.by_regime.items()},
            "by_regime_and_sms": {k: {"n": n, "mape": m} for k, (n, m) in self.by_key.items()},
        }


def _merge(stats: list[ErrorStats]) -> ErrorStats:
    out = ErrorStats()
    for s in stats:
        out.count += s.count
        out.sum_ape += s.sum_ape
        out.sum_raw_ape += s.sum_raw_ape
        out.sum_prior_ape += s.sum_prior_ape
    return out


class Predictor:
    """Launch-aware roofline + per-(regime, SM bucket) online correction + learnt host floors + its own
    running error."""

    def __init__(self, model: ModelDescription | ModelShape, profile: HardwareProfile,
                 execution: ExecutionProfile | None = None, *, forget: float = 0.95, sm_bucket: int = 8,
                 min_key_samples: int = 3, decode_graphs: bool = True) -> None:
        shape = model if isinstance(model, ModelShape) else ModelShape.from_description(model)
        self.roofline = Roofline(shape, profile, execution)
        self.execution = self.roofline.execution
        self.shape = shape
        self.full_sms = self.roofline.full_sms
        self.forget = forget
        self.sm_bucket = max(sm_bucket, 1)
        self.min_key_samples = min_key_samples
        self.decode_graphs = decode_graphs
        self.corrections = {r: Correction(forget=forget) for r in REGIMES}  # pooled over SM counts
        self.keyed: dict[tuple[Regime, int], Correction] = {}
        floor = self.roofline.eager_floor_ms
        self.floors: dict[str, HostFloor] = {p: HostFloor(floor, forget=forget) for p in ("eager-decode", "eager-ragged")}
        self.keyed_floors: dict[tuple[str, int], HostFloor] = {}
        self.errors: dict[tuple[Regime, int], ErrorStats] = {}

    # ------------------------------------------------------------------ shapes -> estimates

    def cost(self, decode_contexts: list[int], chunks: list[tuple[int, int, bool]]) -> BatchCost:
        return batch_cost(self.shape, decode_contexts, chunks)

    def raw_ms(self, cost: BatchCost, sms: int | None = None) -> float:
        """The plain roofline of DESIGN.md (no launch model, no correction)."""
        return self.roofline.step_ms(cost, sms)

    def estimate(self, cost: BatchCost, regime: Regime, sms: int | None = None, graph: bool | None = None,
                 with_roofline: bool = False) -> StepEstimate:
        """Shape-derived times of `cost` on `sms` SMs; `graph` defaults to: decode regimes replay graphs."""
        if graph is None:
            graph = self.decode_graphs and regime in GRAPH_REGIMES and not cost.ragged
        path: Path = "graph" if graph else ("eager-ragged" if cost.ragged else "eager-decode")
        return StepEstimate(self.roofline.device_ms(cost, sms, graph), path, sms or self.full_sms,
                            self.roofline.step_ms(cost, sms) if with_roofline else 0.0)

    # ------------------------------------------------------------------ predictions

    def bucket(self, sms: int) -> int:
        """The SM-count key of a correction: the whole device alone, partitions by `sm_bucket` SMs."""
        return self.full_sms if sms >= self.full_sms else (sms // self.sm_bucket) * self.sm_bucket

    def correction_for(self, regime: Regime, sms: int) -> Correction:
        """The (regime, SM bucket) fit once it has `min_key_samples`; else the regime's pooled fit;
        a multiplexed phase with no data of its own borrows its twin's, in the same order."""
        for r in (regime, _FALLBACK.get(regime)):
            if r is None:
                continue
            keyed = self.keyed.get((r, self.bucket(sms)))
            if keyed is not None and keyed.count >= self.min_key_samples:
                return keyed
            if self.corrections[r].count:
                return self.corrections[r]
        return self.corrections[regime]

    def floor_for(self, path: str, sms: int) -> HostFloor | None:
        """The host floor of an eager launch path on `sms` SMs: the (path, SM bucket) estimate once it
        has `min_key_samples`, else the path's pooled one; None for a CUDA graph."""
        pooled = self.floors.get(path)
        if pooled is None:
            return None
        keyed = self.keyed_floors.get((path, self.bucket(sms)))
        return keyed if keyed is not None and keyed.count >= self.min_key_samples else pooled

    def predict(self, est: StepEstimate, regime: Regime) -> float:
        """The corrected step time (ms) of an estimate."""
        device = self.correction_for(regime, est.sms).apply(est.device_ms)
        floor = self.floor_for(est.path, est.sms)
        return device if floor is None else max(device, floor.value)

    def prior(self, est: StepEstimate) -> float:
        """The uncorrected model: declared constants only."""
        pooled = self.floors.get(est.path)
        return est.device_ms if pooled is None else max(est.device_ms, pooled.prior_ms)

    def predict_ms(self, cost: BatchCost, regime: Regime, sms: int | None = None, graph: bool | None = None) -> float:
        return self.predict(self.estimate(cost, regime, sms, graph), regime) if not cost.empty else 0.0

    # ------------------------------------------------------------------ learning

    def observe(self, regime: Regime, est: StepEstimate | float, measured_ms: float) -> None:
        """Score the current prediction for `est` against `measured_ms`, then learn from it.

        A bare float is a device-time estimate on the whole device with no host floor."""
        if not isinstance(est, StepEstimate):
            est = StepEstimate(float(est), "graph", self.full_sms, float(est))
        if measured_ms <= 0.0 or est.device_ms <= 0.0:
            return
        key = (regime, self.bucket(est.sms))
        raw = est.roofline_ms or est.device_ms
        self.errors.setdefault(key, ErrorStats()).add(self.predict(est, regime), raw, self.prior(est), measured_ms)
        floor = self.floor_for(est.path, est.sms)
        corr = self.correction_for(regime, est.sms)
        device = corr.apply(est.device_ms)
        if floor is not None and (device < floor.value or measured_ms < floor.value):
            # floor-bound (the device fit learns nothing from it), or in under the floor: it is lower
            self._update_floor(est.path, est.sms, measured_ms)
            if device < floor.value:
                return
        self.corrections[regime].update(est.device_ms, measured_ms)
        self.keyed.setdefault(key, Correction(forget=self.forget)).update(est.device_ms, measured_ms)

    def _update_floor(self, path: str, sms: int, measured_ms: float) -> None:
        pooled = self.floors[path]
        key = (path, self.bucket(sms))
        if key not in self.keyed_floors:  # a new SM bucket starts from what the path has learnt
            self.keyed_floors[key] = HostFloor(pooled.value, forget=self.forget)
        self.keyed_floors[key].update(measured_ms)
        pooled.update(measured_ms)

    def report(self) -> PredictorReport:
        total = _merge(list(self.errors.values()))
        by: dict[str, tuple[int, float, float]] = {}
        for r in REGIMES:
            s = _merge([v for (reg, _), v in self.errors.items() if reg == r])
            if s.count:
                by[r] = (s.count, s.mape, s.raw_mape)
        by_key = {f"{r}@{sms}": (s.count, s.mape) for (r, sms), s in sorted(self.errors.items())}
        return PredictorReport(total.count, total.mape, total.raw_mape, by, total.prior_mape, by_key)
