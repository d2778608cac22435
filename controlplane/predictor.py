"""The control plane's latency predictor: the shared roofline, corrected online by measured step times.

`Predictor.raw_ms` is the roofline of `shared.roofline` for the worker's model and HardwareProfile.
`Predictor.predict_ms` applies a per-regime correction learnt from the data plane's measurements:
an exponentially-forgetting least-squares fit `measured ~ a + b * raw` (a fixed cost the roofline
does not see, such as kernel launches, and a scale), pulled towards `a = 0, b = 1` until data
arrives, with outliers clipped to 4x the current prediction once it has a few samples; with one
kind of batch it reduces to the EWMA of measured / predicted. Every observation
is first scored against the prediction made before it (absolute percentage error), so `report()`
is an honest running MAPE per regime. Pure: no I/O, no torch, no scheduling decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.messages import HardwareProfile, ModelDescription
from shared.roofline import BatchCost, ModelShape, Roofline, batch_cost

Regime = Literal["decode", "prefill", "mixed", "mux_decode", "mux_prefill"]
REGIMES: tuple[Regime, ...] = ("decode", "prefill", "mixed", "mux_decode", "mux_prefill")
# A multiplexed phase borrows its aggregated twin's correction until it has data of its own.
_FALLBACK: dict[Regime, Regime] = {"mux_decode": "decode", "mux_prefill": "prefill"}


def regime_of(num_decode: int, num_other: int) -> Regime:
    """decode-only, prefill-only (no decode item) or mixed."""
    if num_other == 0:
        return "decode"
    return "prefill" if num_decode == 0 else "mixed"


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

    def apply(self, raw_ms: float) -> float:
        return max(self.a + self.b * raw_ms, 0.1 * raw_ms, 0.0)

    def update(self, raw_ms: float, measured_ms: float) -> None:
        if self.n >= self.warmup:  # an outlier (a GC pause, a preempted host) moves the fit 4x at most
            predicted = self.apply(raw_ms)
            measured_ms = min(max(measured_ms, predicted / self.outlier_ratio), predicted * self.outlier_ratio)
        lam = self.forget
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
class ErrorStats:
    count: int = 0
    sum_ape: float = 0.0
    sum_raw_ape: float = 0.0

    @property
    def mape(self) -> float:
        return self.sum_ape / self.count if self.count else 0.0

    @property
    def raw_mape(self) -> float:
        return self.sum_raw_ape / self.count if self.count else 0.0


@dataclass(frozen=True)
class PredictorReport:
    """Running error of the predictor: corrected MAPE and the raw roofline's, overall and per regime."""

    count: int
    mape: float
    raw_mape: float
    by_regime: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # n, mape, raw mape

    def as_dict(self) -> dict[str, object]:
        return {
            "n_samples": self.count, "mape": self.mape, "mape_raw_roofline": self.raw_mape,
            "by_regime": {k: {"n": n, "mape": m, "mape_raw_roofline": r} for k, (n, m, r) in self.by_regime.items()},
        }


class Predictor:
    """Roofline + per-regime online correction + its own running error."""

    def __init__(self, model: ModelDescription | ModelShape, profile: HardwareProfile, *,
                 forget: float = 0.95) -> None:
        shape = model if isinstance(model, ModelShape) else ModelShape.from_description(model)
        self.roofline = Roofline(shape, profile)
        self.shape = shape
        self.full_sms = self.roofline.full_sms
        self.corrections = {r: Correction(forget=forget) for r in REGIMES}
        self.errors = {r: ErrorStats() for r in REGIMES}

    def cost(self, decode_contexts: list[int], chunks: list[tuple[int, int, bool]]) -> BatchCost:
        return batch_cost(self.shape, decode_contexts, chunks)

    def raw_ms(self, cost: BatchCost, sms: int | None = None) -> float:
        return self.roofline.step_ms(cost, sms)

    def correct(self, regime: Regime, raw_ms: float) -> float:
        correction = self.corrections[regime]
        if correction.n == 0.0 and regime in _FALLBACK:
            correction = self.corrections[_FALLBACK[regime]]
        return correction.apply(raw_ms)

    def predict_ms(self, cost: BatchCost, regime: Regime, sms: int | None = None) -> float:
        return self.correct(regime, self.raw_ms(cost, sms))

    def observe(self, regime: Regime, raw_ms: float, measured_ms: float) -> None:
        """Score the current prediction for `raw_ms` against `measured_ms`, then learn from it."""
        if measured_ms <= 0.0 or raw_ms <= 0.0:
            return
        stats = self.errors[regime]
        stats.count += 1
        stats.sum_ape += abs(self.correct(regime, raw_ms) - measured_ms) / measured_ms
        stats.sum_raw_ape += abs(raw_ms - measured_ms) / measured_ms
        self.corrections[regime].update(raw_ms, measured_ms)

    def report(self) -> PredictorReport:
        total = sum(s.count for s in self.errors.values())
        ape = sum(s.sum_ape for s in self.errors.values())
        raw = sum(s.sum_raw_ape for s in self.errors.values())
        by = {r: (s.count, s.mape, s.raw_mape) for r, s in self.errors.items() if s.count}
        return PredictorReport(total, ape / total if total else 0.0, raw / total if total else 0.0, by)
