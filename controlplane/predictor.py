"""The control plane's latency predictor: a launch-aware roofline, corrected online by measured step times.

Model of one step on S SMs (`shared.roofline`, constants from the worker's HardwareProfile and the
declared `ExecutionProfile`):

    device = roofline (ragged-kernel tiles included) + kernels * kernel_us (+ pre-replay host time)
    fit    = a + b * device + c * compute + d * ragged
    t      = max(fit, floor)     an eager step: the host must launch it op by op
    t      = fit                 a decode step replayed as a CUDA graph

`compute` is the step's dense FLOPs at Pi(S): the roofline's max() hides it wherever the weight
reads dominate, yet real small-M GEMMs add it (decode steps grow ~0.8 ms per ms of it on an H200,
on every SM count); `ragged` is the ragged kernel's attention (0 in a decode-kernel step), the
least certain part of the model (a decode item as a whole tile; slower still on a partition).
The fit is an exponentially-forgetting least squares in relative error per (regime, SM-count
bucket), with outliers clipped to 4x the current prediction once it has a few samples and a ridge
prior: a regime's pooled fit (over all SM counts) is pulled towards the uncorrected model
`a = 0, b = 1, c = d = 0`, each bucket's fit towards its pooled fit, so what is shared across SM
counts (the compute term's weight) need not be relearnt per bucket. A bucket with fewer than
`min_key_samples` fits uses the regime's pooled fit (and a multiplexed phase its aggregated twin's).
`floor` is learnt per (launch path, SM bucket) -- eager decode kernel or eager ragged kernel; the
host floor differs by partition -- starting from the path's pooled floor and used from the first
floor-bound step it sees: a measurement whose device prediction lies below the floor is
floor-bound and moves the floor, any other moves the device fit (and the floor too, if it came in
under it). Every observation is first scored against the prediction made before it (absolute
percentage error), so `report()` is an honest running MAPE, per regime and per (regime, SM
bucket); it also scores the plain roofline of DESIGN.md (`raw`) and the uncorrected launch-aware
model (`prior`) on the same steps.
Pure: no I/O, no torch, no scheduling decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from shared.messages import HardwareProfile, ModelDescription
from shared.profiles import ExecutionProfile
from shared.roofline import BatchCost, ModelShape, Roofline, batch_cost

Regime = Literal["decode", "prefill", "mixed", "mux_decode", "mux_prefill"]
REGIMES: tuple[Regime, ...] = ("decode", "prefill", "mixed", "mux_decode", "mux_prefill")
# A multiplexed phase borrows its aggregated twin's correction until it has data of its own.
_FALLBACK: dict[Regime, Regime] = {"mux_decode": "decode", "mux_prefill": "prefill"}
# Decode-only steps replay CUDA graphs (aggregated on the whole device, multiplexed on a partition).
GRAPH_REGIMES: frozenset[str] = frozenset({"decode", "mux_decode"})
# How a step is launched: a CUDA graph; eagerly (decode-only or with prefill rows); or as piecewise
# graphs around eager attention (prefill and mixed passes up to WorkerReady.piecewise_max_tokens).
Path = Literal["graph", "eager-decode", "eager-ragged", "piecewise"]


def regime_of(num_decode: int, num_other: int) -> Regime:
    """decode-only, prefill-only (no decode item) or mixed."""
    if num_other == 0:
        return "decode"
    return "prefill" if num_decode == 0 else "mixed"


class StepEstimate(msgspec.Struct, frozen=True):
    """One step's shape-derived times: what the predictor corrects and learns from.

    `path` says how the step is launched: "graph" (no host floor) or eagerly through the decode or
    the ragged attention kernel (each its own host floor). `roofline_ms` is the plain roofline,
    kept to report its error next to the model's (0 when not asked for). `compute_ms` (the dense
    FLOPs at Pi(S)) and `ragged_ms` (the ragged kernel's attention, 0 for a decode-kernel step) are
    parts of `device_ms` that the correction weighs on their own: see `Roofline.device_terms`.
    A Struct rather than a frozen dataclass: every observed step builds one or two (about 10x
    cheaper to build)."""

    device_ms: float
    path: Path
    sms: int
    roofline_ms: float = 0.0
    compute_ms: float = 0.0
    ragged_ms: float = 0.0

    @property
    def eager(self) -> bool:
        return self.path != "graph"


FEATURES = 4  # of a device fit: 1, device, dense compute, ragged attention
KEYED_FLOOR_SAMPLES = 2  # floor-bound steps before an SM bucket's own host floor is used: one can be a hiccup
_UNCORRECTED = (0.0, 1.0, 0.0, 0.0)  # measured = device: the launch-aware model as declared


def _solve_spd(m: list[list[float]], r: list[float]) -> list[float]:
    """x with m x = r for a symmetric positive-definite m (elimination without pivoting, which such
    a matrix does not need); overwrites m and r."""
    n = len(r)
    for k in range(n):
        row_k, pivot = m[k], m[k][k]
        for i in range(k + 1, n):
            row_i = m[i]
            f = row_i[k] / pivot
            for j in range(k + 1, n):
                row_i[j] -= f * row_k[j]
            r[i] -= f * r[k]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        row_i, acc = m[i], r[i]
        for j in range(i + 1, n):
            acc -= row_i[j] * x[j]
        x[i] = acc / row_i[i]
    return x


@dataclass
class Correction:
    """Online fit of measured = a + b * device + c * compute + d * ragged (`StepEstimate`'s terms).

    Exponentially forgetting least squares in relative error (each observation weighted by
    1 / measured^2: a 5 ms decode counts as much as a 300 ms prefill, as in the MAPE it is judged
    by), with a ridge prior worth `prior_weight` average observations that pulls the coefficients
    towards `parent`'s (a pooled fit: what the other SM buckets of the regime have learnt), or
    towards the uncorrected `a = 0, b = 1, c = d = 0` where there is none. A term not yet seen
    non-zero keeps its prior coefficient."""

    forget: float = 0.95
    prior_weight: float = 0.5
    warmup: float = 5.0
    outlier_ratio: float = 4.0
    parent: Correction | None = field(default=None, repr=False, compare=False)
    n: float = 0.0
    count: int = 0  # observations learnt from
    coef: list[float] = field(default_factory=lambda: list(_UNCORRECTED))
    _m: list[list[float]] = field(default_factory=lambda: [[0.0] * FEATURES for _ in range(FEATURES)], repr=False)
    _r: list[float] = field(default_factory=lambda: [0.0] * FEATURES, repr=False)

    @property
    def a(self) -> float:
        return self.coef[0]

    @property
    def b(self) -> float:
        return self.coef[1]

    def apply(self, device_ms: float, compute_ms: float = 0.0, ragged_ms: float = 0.0) -> float:
        c = self.coef
        return max(c[0] + c[1] * device_ms + c[2] * compute_ms + c[3] * ragged_ms, 0.1 * device_ms, 0.0)

    def update(self, device_ms: float, measured_ms: float, compute_ms: float = 0.0, ragged_ms: float = 0.0) -> None:
        if self.n >= self.warmup:  # an outlier (a GC pause, a preempted host) moves the fit 4x at most
            predicted = self.apply(device_ms, compute_ms, ragged_ms)
            measured_ms = min(max(measured_ms, predicted / self.outlier_ratio), predicted * self.outlier_ratio)
        if not measured_ms > 0.0:  # also NaN: a broken timing teaches nothing
            return
        x = (1.0, device_ms, compute_ms, ragged_ms)
        lam, w = self.forget, 1.0 / (measured_ms * measured_ms)
        self.count += 1
        self.n = lam * self.n + 1.0
        m, r = self._m, self._r  # m: the upper triangle of the weighted Gram matrix
        for i in range(FEATURES):
            wx = w * x[i]
            r[i] = lam * r[i] + wx * measured_ms
            row = m[i]
            for j in range(i, FEATURES):
                row[j] = lam * row[j] + wx * x[j]
        self._fit()

    def _fit(self) -> None:
        """Minimise sum w (y - coef . x)^2 + sum_i p_i (coef_i - center_i)^2 over the terms seen so far
        (a term never seen non-zero keeps the center's coefficient), p_i = `prior_weight` times term
        i's mean weighted square per observation (for the compute and ragged terms at least the
        device term's): a linear system of at most 4 unknowns."""
        parent = self.parent
        center = parent.coef if parent is not None and parent.count else _UNCORRECTED
        gram, pw = self._m, self.prior_weight / self.n
        active = [i for i in range(FEATURES) if gram[i][i] > 0.0]
        m = [[gram[i][j] if i <= j else gram[j][i] for j in active] for i in active]
        # the compute and ragged terms are parts of the device time (ms, like it): their ridge is at
        # least the device term's, so a term seen only tiny so far cannot take a huge coefficient
        ridge = [pw * (gram[i][i] if i < 2 else max(gram[i][i], 0.1 * gram[1][1])) for i in range(FEATURES)]
        r = [self._r[i] + ridge[i] * center[i] for i in active]
        for k, i in enumerate(active):
            m[k][k] += ridge[i]
        coef = list(center)
        for k, v in zip(active, _solve_spd(m, r)):
            coef[k] = v
        if coef[1] <= 0.0:  # a fit that says "slower batches run faster" is noise: keep the scale only
            coef = [0.0, max(self._r[1], 1e-12) / max(gram[1][1], 1e-12), 0.0, 0.0]
        self.coef = coef


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
        # a hiccup (GC pause, preempted host) moves the floor at most outlier_ratio, or 2x while
        # the estimate is young and a single sample weighs most
        ratio = self.outlier_ratio if self.count >= self.warmup else min(self.outlier_ratio, 2.0)
        v = self.value
        measured_ms = min(max(measured_ms, v / ratio), v * ratio)
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
                 min_key_samples: int = 3, decode_graphs: bool = True, piecewise_max_tokens: int = 0) -> None:
        shape = model if isinstance(model, ModelShape) else ModelShape.from_description(model)
        self.roofline = Roofline(shape, profile, execution)
        self.execution = self.roofline.execution
        self.shape = shape
        self.full_sms = self.roofline.full_sms
        self.forget = forget
        self.sm_bucket = max(sm_bucket, 1)
        self.min_key_samples = min_key_samples
        self.decode_graphs = decode_graphs
        self.piecewise_max_tokens = piecewise_max_tokens
        self.corrections = {r: Correction(forget=forget) for r in REGIMES}  # pooled over SM counts
        self.keyed: dict[tuple[Regime, int], Correction] = {}
        floor = self.roofline.eager_floor_ms
        self.floors: dict[str, HostFloor] = {p: HostFloor(floor, forget=forget) for p in ("eager-decode", "eager-ragged")}
        self.floors["piecewise"] = HostFloor(self.roofline.piecewise_floor_ms, forget=forget)
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
        graph, path = self._launch(cost, regime, graph, sms)
        device, compute, ragged = self.roofline.device_terms(cost, sms, graph)
        roofline = self.roofline.step_ms(cost, sms) if with_roofline else 0.0
        return StepEstimate(device, path, sms or self.full_sms, roofline, compute, ragged)

    def _launch(self, cost: BatchCost, regime: Regime, graph: bool | None, sms: int | None) -> tuple[bool, Path]:
        if graph is None:
            graph = self.decode_graphs and regime in GRAPH_REGIMES and not cost.ragged
        if graph:
            return True, "graph"
        if not cost.ragged:
            return False, "eager-decode"
        pieces = self.roofline.replays_pieces(cost, sms, self.piecewise_max_tokens)
        return False, "piecewise" if pieces else "eager-ragged"

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
        has seen `KEYED_FLOOR_SAMPLES` floor-bound steps (it starts from the pooled value), else the
        path's pooled one; None for a CUDA graph."""
        pooled = self.floors.get(path)
        if pooled is None:
            return None
        keyed = self.keyed_floors.get((path, self.bucket(sms)))
        return keyed if keyed is not None and keyed.count >= KEYED_FLOOR_SAMPLES else pooled

    def predict(self, est: StepEstimate, regime: Regime) -> float:
        """The corrected step time (ms) of an estimate."""
        return self._corrected(regime, est.sms, est.path, est.device_ms, est.compute_ms, est.ragged_ms)

    def _corrected(self, regime: Regime, sms: int, path: str, device_ms: float, compute_ms: float,
                   ragged_ms: float) -> float:
        device = self.correction_for(regime, sms).apply(device_ms, compute_ms, ragged_ms)
        floor = self.floor_for(path, sms)
        return device if floor is None else max(device, floor.value)

    def prior(self, est: StepEstimate) -> float:
        """The uncorrected model: declared constants only."""
        pooled = self.floors.get(est.path)
        return est.device_ms if pooled is None else max(est.device_ms, pooled.prior_ms)

    def predict_ms(self, cost: BatchCost, regime: Regime, sms: int | None = None, graph: bool | None = None) -> float:
        """`predict(estimate(cost, ...))` without building the estimate: the scheduler's hot path."""
        if cost.empty:
            return 0.0
        graph, path = self._launch(cost, regime, graph, sms)
        return self._corrected(regime, sms or self.full_sms, path, *self.roofline.device_terms(cost, sms, graph))

    # ------------------------------------------------------------------ learning

    def observe(self, regime: Regime, est: StepEstimate | float, measured_ms: float) -> None:
        """Score the current prediction for `est` against `measured_ms`, then learn from it.

        A bare float is a device-time estimate on the whole device with no host floor."""
        if not isinstance(est, StepEstimate):
            est = StepEstimate(float(est), "graph", self.full_sms, float(est))
        if not (math.isfinite(measured_ms) and measured_ms > 0.0 and est.device_ms > 0.0):  # NaN, inf: broken timings
            return
        key = (regime, self.bucket(est.sms))
        stats = self.errors.get(key)
        if stats is None:
            stats = self.errors[key] = ErrorStats()
        # the prediction as `predict` makes it, its parts kept for the learning below
        device = self.correction_for(regime, est.sms).apply(est.device_ms, est.compute_ms, est.ragged_ms)
        floor = self.floor_for(est.path, est.sms)
        floor_ms = floor.value if floor is not None else 0.0
        predicted = device if floor is None else max(device, floor_ms)
        stats.add(predicted, est.roofline_ms or est.device_ms, self.prior(est), measured_ms)
        terms = (est.device_ms, measured_ms, est.compute_ms, est.ragged_ms)
        if floor is not None and (device < floor_ms or measured_ms < floor_ms):
            # floor-bound (the device fit learns nothing from it), or in under the floor: it is lower
            self._update_floor(est.path, est.sms, measured_ms)
            if device < floor.value:  # the floor as updated
                return
        pooled = self.corrections[regime]
        pooled.update(*terms)
        keyed = self.keyed.get(key)
        if keyed is None:  # a new SM bucket's fit is pulled towards the regime's pooled one
            keyed = self.keyed[key] = Correction(forget=self.forget, parent=pooled)
        keyed.update(*terms)

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
