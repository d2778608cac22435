"""Step policies: which work a step takes (composition) and how it runs (aggregated or multiplexed).

The scheduler drafts a batch in the order a policy asks for (`decode_first`: every decode, then
prefill chunks under the token budget; `prefill_first`: prefill chunks only while any prompt can
run, else decodes), summarises it as a `BatchShape`, and asks the policy for a `ModeDecision`.
Policies: `aggregated` (vLLM-style), `prefill-first` (SGLang's default), `static` (fixed split and
look-ahead) and `duet` (the predictor and optimizer of DESIGN.md). `StepForecast` holds one step's
roofline costs so the policy and the predictor's online correction share them; its observations
carry each phase's `StepEstimate` (device time, launch path, SM count) for the predictor to learn from.
Pure decisions: no I/O, no sockets, no torch; the scheduler applies them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from operator import sub
from typing import Literal, Protocol

from controlplane.optimizer import Split, candidate_splits, decide, useful_decode_tokens
from controlplane.predictor import Predictor, Regime, StepEstimate, regime_of
from shared.config import DuetSlo, SchedulerConfig
from shared.messages import Mode, WorkerReady
from shared.profiles import execution_profile_for
from shared.roofline import BatchCost

log = logging.getLogger(__name__)

Composition = Literal["decode_first", "prefill_first"]


@dataclass
class BatchShape:
    """A drafted batch as the policies see it. Decode items have one new token that samples."""

    decode_contexts: list[int] = field(default_factory=list)  # cached tokens of each decode item
    # tokens each decode item may still emit: filled only for policies that read it (`wants_remaining`)
    decode_remaining: list[int] = field(default_factory=list)
    chunks: list[tuple[int, int, bool]] = field(default_factory=list)  # other items: (q, c, samples)
    # Filled only for policies that ask (`wants_slack`): per decode item, its output tokens before
    # this step's (in flight included) and the time since its first token reached the control plane
    # (0 while that token is still in flight); how long the steps in flight still run.
    decode_outputs: list[int] = field(default_factory=list)
    decode_age_ms: list[float] = field(default_factory=list)
    ahead_ms: float = 0.0

    @property
    def num_decode(self) -> int:
        return len(self.decode_contexts)

    @property
    def prefill_tokens(self) -> int:
        return sum(q for q, _, _ in self.chunks)


@dataclass(frozen=True)
class ModeDecision:
    mode: Mode = "aggregated"
    prefill_sms: int = 0
    decode_sms: int = 0
    decode_steps: int = 1
    predicted_ms: float = 0.0  # the step's predicted time, where the policy predicted it (else 0)
    prefill_tokens: int | None = None  # aggregated with the batch's chunks cut to this many tokens


AGGREGATED = ModeDecision()
# duet with slo="tpot" plans for this fraction of the TPOT SLO: room for prediction error and pace changes
TPOT_TARGET = 0.9
# duet's trimmed-chunk candidate keeps at least this many prefill tokens (fewer: the step is mostly an
# eager launch for nothing, and prompts would starve)
MIN_TRIMMED_PREFILL = 256


def trim_chunks(chunks: list[tuple[int, int, bool]], cap: int) -> list[tuple[int, int, bool]]:
    """The chunks a step keeps when its prefill tokens are cut to `cap`, from the last chunk back
    (the scheduler cuts its draft the same way): a cut chunk no longer samples."""
    out: list[tuple[int, int, bool]] = []
    left = cap
    for q, c, samples in chunks:
        if left <= 0:
            break
        if q <= left:
            out.append((q, c, samples))
            left -= q
        else:
            out.append((left, c, False))
            left = 0
    return out


class StepForecast:
    """Roofline costs of one drafted batch (whole, prefill part, decode part), computed once."""

    def __init__(self, predictor: Predictor, batch: BatchShape, decode: BatchCost | None = None) -> None:
        """`decode`: the decode part's cost when already known (the same decode items)."""
        self.predictor = predictor
        self.batch = batch
        self.decode: BatchCost = predictor.cost(batch.decode_contexts, []) if decode is None else decode
        self.prefill: BatchCost = predictor.cost([], batch.chunks)
        self.mixed: BatchCost = self.decode.merge(self.prefill) if batch.chunks and batch.num_decode else (
            self.decode if not batch.chunks else self.prefill)
        self.regime: Regime = regime_of(batch.num_decode, len(batch.chunks))

    def trimmed(self, cap: int) -> StepForecast:
        """The forecast of this batch with its chunks cut to `cap` tokens (`trim_chunks`); its
        `batch` is a new BatchShape sharing the decode items' lists."""
        b = self.batch
        batch = BatchShape(b.decode_contexts, b.decode_remaining, trim_chunks(b.chunks, cap), b.decode_outputs,
                           b.decode_age_ms, b.ahead_ms)
        return StepForecast(self.predictor, batch, self.decode)

    def mixed_ms(self) -> float:
        """Corrected prediction of the whole batch, aggregated on the whole device."""
        return self.predictor.predict_ms(self.mixed, self.regime)

    def observations(self, decision: ModeDecision) -> list[tuple[Regime, StepEstimate, str]]:
        """(regime, the step's estimate, which measured timing to compare with) for this step."""
        est = self.predictor.estimate
        if decision.mode == "aggregated":
            return [(self.regime, est(self.mixed, self.regime, with_roofline=True), "total")]
        out: list[tuple[Regime, StepEstimate, str]] = []
        if not self.prefill.empty:
            out.append(("mux_prefill", est(self.prefill, "mux_prefill", decision.prefill_sms, with_roofline=True),
                        "prefill"))
        if not self.decode.empty:
            out.append(("mux_decode", est(self.decode, "mux_decode", decision.decode_sms, with_roofline=True),
                        "decode"))
        return out


class Policy(Protocol):
    name: str
    composition: Composition
    wants_slack: bool  # whether `decide` reads BatchShape's SLO-slack fields
    wants_remaining: bool  # whether `decide` reads BatchShape.decode_remaining

    def decide(self, batch: BatchShape, forecast: StepForecast | None) -> ModeDecision: ...


@dataclass
class AggregatedPolicy:
    """vLLM-style: one decode-first chunked-prefill batch on the whole GPU, every step."""

    name: str = "aggregated"
    composition: Composition = "decode_first"
    wants_slack: bool = False
    wants_remaining: bool = False

    def decide(self, batch: BatchShape, forecast: StepForecast | None) -> ModeDecision:
        return AGGREGATED


@dataclass
class PrefillFirstPolicy:
    """SGLang's default: a prefill-only batch whenever prompts can run, otherwise a decode batch."""

    name: str = "prefill-first"
    composition: Composition = "prefill_first"
    wants_slack: bool = False
    wants_remaining: bool = False

    def decide(self, batch: BatchShape, forecast: StepForecast | None) -> ModeDecision:
        return AGGREGATED


@dataclass
class StaticPolicy:
    """Multiplexed on a fixed split with a fixed look-ahead whenever prefill and decode coexist."""

    split: Split | None
    lookahead: int
    name: str = "static"
    composition: Composition = "decode_first"
    wants_slack: bool = False
    wants_remaining: bool = False

    def decide(self, batch: BatchShape, forecast: StepForecast | None) -> ModeDecision:
        if self.split is None or not batch.num_decode or not batch.chunks:
            return AGGREGATED
        return ModeDecision("multiplexed", self.split.prefill_sms, self.split.decode_sms, self.lookahead)


@dataclass
class DuetPolicy:
    """DESIGN.md: aggregated while the mixed batch fits the step budget, else the optimizer's split.

    The step budget is the TBT SLO (`slo="tbt"`, the paper's rule) or, with `slo="tpot"`, what
    every decode item's TPOT can absorb against `TPOT_TARGET` of the SLO: the longest step time
    that, repeated for this token and the item's next `horizon - 1` (fewer if it ends sooner),
    after the steps in flight, keeps (time since its first token) / (tokens - 1) at the target.
    A request that banked time on fast steps lets a long step through; a new one allows about the
    target; never below the target. Multiplexed decode steps always keep the TBT SLO.

    When the mixed batch breaks the budget, the optimizer's best split competes (with `trim`) with
    the same batch aggregated but its chunks cut to fit the budget; the higher tokens per ms wins
    (the split's objective counts its look-ahead decode tokens). If neither fits, the smallest
    trimmed step runs (it overruns least).
    """

    splits: list[Split]
    tbt_slo_ms: float
    max_lookahead: int
    hysteresis: float
    slo: DuetSlo = "tbt"
    horizon: int = 16
    trim: bool = False
    previous: Split | None = None
    name: str = "duet"
    composition: Composition = "decode_first"
    wants_slack: bool = False
    wants_remaining: bool = True

    def __post_init__(self) -> None:
        self.wants_slack = self.slo == "tpot"

    def step_budget_ms(self, batch: BatchShape) -> float:
        """How long this step may take: the TBT SLO, or the longest step time that every decode item
        could sustain for this token and its next `horizon - 1` with its TPOT at the target."""
        slo = self.tbt_slo_ms
        if not self.wants_slack or not batch.decode_outputs:
            return slo
        target, h, ahead = slo * TPOT_TARGET, self.horizon, batch.ahead_ms
        outputs, ages, remaining = batch.decode_outputs, batch.decode_age_ms, batch.decode_remaining
        # m more tokens at s ms each, after `ahead`: (age + ahead + m s) / (n + m - 1) <= target, so
        # s <= (target * (n + m - 1) - age - ahead) / m; for every item with m = h that is the least
        # target * n - age. Usually every item outlasts the horizon: then that least is taken over
        # all of them by map (this runs for every decode item of every step)
        if min(remaining, default=0) >= h:
            least: float | None = min(map(sub, map(target.__mul__, outputs), ages))
            short: list[tuple[int, float, int]] = []
        else:
            items = list(zip(outputs, ages, remaining))
            least = min((target * n - age for n, age, r in items if r >= h), default=None)
            short = [item for item in items if item[2] < h]
        allowed = (least + target * (h - 1) - ahead) / h if least is not None else float("inf")
        for n, age, r in short:  # ends within the horizon: its own m
            v = (target * (n + r - 1) - age - ahead) / r
            if v < allowed:
                allowed = v
        return allowed if allowed > target else target

    def decide(self, batch: BatchShape, forecast: StepForecast | None) -> ModeDecision:
        if forecast is None:
            return AGGREGATED
        if not (self.splits or self.trim) or not batch.num_decode or not batch.chunks:
            # the scheduler's estimate of the steps in flight wants this step's time too
            return ModeDecision(predicted_ms=forecast.mixed_ms()) if self.wants_slack else AGGREGATED
        mixed_ms = forecast.mixed_ms()
        budget = self.step_budget_ms(batch)
        if mixed_ms <= budget:
            return ModeDecision(predicted_ms=mixed_ms)
        pred = forecast.predictor
        choice = decide(
            mixed_ms, budget, self.splits,
            lambda s: pred.predict_ms(forecast.prefill, "mux_prefill", s),
            lambda s: pred.predict_ms(forecast.decode, "mux_decode", s),
            batch.prefill_tokens, useful_decode_tokens(batch.decode_remaining, self.max_lookahead),
            self.previous, self.hysteresis, tbt_ms=self.tbt_slo_ms,
        ) if self.splits else None
        trimmed = self.trimmed(batch, forecast, budget, mixed_ms) if self.trim else None
        if trimmed is not None and (choice is None or trimmed[2] >= choice.objective):
            return ModeDecision(predicted_ms=trimmed[1], prefill_tokens=trimmed[0])
        if choice is None:
            return self._overrun(batch, forecast, mixed_ms)
        self.previous = choice.split
        return ModeDecision("multiplexed", choice.split.prefill_sms, choice.split.decode_sms, choice.k,
                            choice.step_ms)

    def aggregated(self, batch: BatchShape, forecast: StepForecast) -> ModeDecision:
        """`decide` with no split allowed (the scheduler's step must run aggregated): the whole batch if it
        fits the step budget, else (with `trim`) its chunks cut to fit, else the step that overruns least."""
        mixed_ms = forecast.mixed_ms()
        budget = self.step_budget_ms(batch)
        if mixed_ms <= budget or not batch.num_decode or not batch.chunks:
            return ModeDecision(predicted_ms=mixed_ms)
        trimmed = self.trimmed(batch, forecast, budget, mixed_ms) if self.trim else None
        if trimmed is not None:
            return ModeDecision(predicted_ms=trimmed[1], prefill_tokens=trimmed[0])
        return self._overrun(batch, forecast, mixed_ms)

    def _overrun(self, batch: BatchShape, forecast: StepForecast, mixed_ms: float) -> ModeDecision:
        """Nothing meets the budget: with `trim` the smallest trimmed step (it overruns least), else the batch."""
        if self.trim and batch.prefill_tokens > MIN_TRIMMED_PREFILL:
            return ModeDecision(predicted_ms=_trimmed_ms(batch, forecast, MIN_TRIMMED_PREFILL),
                                prefill_tokens=MIN_TRIMMED_PREFILL)
        return ModeDecision(predicted_ms=mixed_ms)

    def trimmed(self, batch: BatchShape, forecast: StepForecast, budget_ms: float,
                full_ms: float | None = None) -> tuple[int, float, float] | None:
        """The aggregated step with the most prefill tokens that fits `budget_ms` (to within ~6%, by
        false position on the predicted mixed time, which is close to linear in the tokens kept;
        chunks cut from the last one back): (prefill tokens, predicted ms, tokens per ms), or None
        if fewer than MIN_TRIMMED_PREFILL tokens fit. `full_ms`: the whole batch's prediction."""

        def mixed_ms(cap: int) -> float:
            return _trimmed_ms(batch, forecast, cap)

        lo, hi = MIN_TRIMMED_PREFILL, batch.prefill_tokens
        if hi <= lo or (lo_ms := mixed_ms(lo)) > budget_ms:
            return None
        hi_ms = forecast.mixed_ms() if full_ms is None else full_ms
        for _ in range(6):  # each probe costs a roofline evaluation
            if hi_ms <= budget_ms:  # the whole batch fits after all
                lo, lo_ms = hi, hi_ms
                break
            if hi - lo <= max(lo // 16, 16):
                break
            cap = lo + int((budget_ms - lo_ms) / max(hi_ms - lo_ms, 1e-9) * (hi - lo))
            cap = min(max(cap, lo + 1), hi - 1)
            ms = mixed_ms(cap)
            if ms <= budget_ms:
                lo, lo_ms = cap, ms
            else:
                hi, hi_ms = cap, ms
        return lo, lo_ms, (batch.num_decode + lo) / max(lo_ms, 1e-9)


def aggregated_decision(policy: Policy, batch: BatchShape, forecast: StepForecast | None) -> ModeDecision:
    """What `policy` decides for a step that must run aggregated: a policy that weighs aggregated steps
    (duet: its step budget, its trimmed chunks) says; any other runs the batch whole."""
    fallback = getattr(policy, "aggregated", None)
    if fallback is None or forecast is None:
        return AGGREGATED
    return fallback(batch, forecast)


def _trimmed_ms(batch: BatchShape, forecast: StepForecast, cap: int) -> float:
    """Predicted time of the batch aggregated with its chunks cut to `cap` tokens."""
    pred = forecast.predictor
    return pred.predict_ms(forecast.decode.merge(pred.cost([], trim_chunks(batch.chunks, cap))), "mixed")


def _static_split(config: SchedulerConfig, ready: WorkerReady) -> Split | None:
    sizes = ready.partition_sm_counts
    if not sizes:
        return None
    decode = min(sizes, key=lambda s: (abs(s - config.static_decode_sms), s))
    if decode != config.static_decode_sms:
        log.warning("static split: %d decode SMs is not a partition size; using %d", config.static_decode_sms, decode)
    return Split(ready.device.sm_count - decode, decode)


def make_policy(config: SchedulerConfig, ready: WorkerReady | None) -> Policy:
    """The configured policy for this worker; multiplexing policies fall back to aggregated steps
    (and say so) where the worker cannot split its SMs or sent no profile to predict with."""
    can_split = bool(ready and ready.supports_multiplexing and ready.partition_sm_counts and ready.device.sm_count)
    if config.policy == "static" and not can_split:
        log.warning("policy static: the data plane cannot multiplex; every step runs aggregated")
    if config.policy == "duet" and ready is not None and ready.device.kind == "cpu":
        # the default, so no fault: plain aggregated steps, chunks never trimmed either (a CPU's steps all
        # break a GPU's SLO, and trimming would cut every prompt chunk to MIN_TRIMMED_PREFILL tokens)
        log.info("policy duet: a CPU data plane; every step runs aggregated")
        return AggregatedPolicy()
    if config.policy == "duet" and not can_split:
        log.warning("policy duet: the data plane cannot split its SMs; every step runs aggregated, its prompt "
                    "chunks %s", "cut to the step budget when it would break it" if config.duet_trim else "whole")
    if config.policy == "prefill-first":
        return PrefillFirstPolicy()
    if config.policy == "static":
        return StaticPolicy(_static_split(config, ready) if can_split and ready else None, config.static_lookahead)
    if config.policy == "duet":
        if ready is not None and ready.profile is None:
            log.warning("policy duet: the data plane sent no hardware profile; every step runs aggregated")
        splits = candidate_splits(ready.device.sm_count, ready.partition_sm_counts) if can_split and ready else []
        return DuetPolicy(splits, config.tbt_slo_ms, config.max_lookahead, config.hysteresis,
                          config.duet_slo, config.tpot_horizon, config.duet_trim)
    return AggregatedPolicy()


def make_predictor(ready: WorkerReady | None) -> Predictor | None:
    """The worker's predictor: its profile, and the declared launch model of its GPU and backend
    (flashinfer on CUDA replays decode steps as CUDA graphs; other backends run every step eagerly)."""
    if ready is None or ready.profile is None:
        return None
    execution = execution_profile_for(ready.device.name, ready.attention_backend)
    return Predictor(ready.model, ready.profile, execution,
                     decode_graphs=ready.attention_backend.startswith("flashinfer"),
                     piecewise_max_tokens=ready.piecewise_max_tokens)
