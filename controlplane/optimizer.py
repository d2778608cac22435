"""DuetServe's partition optimizer: aggregated or multiplexed, and for multiplexed the SM split and `k`.

Given predicted times of the decode-first mixed batch on the whole GPU, and of its prefill part and
decode part on candidate partitions, `decide` keeps the batch aggregated when it fits the step
budget (the TBT SLO, or the longer step the running requests' TPOT can absorb, see `policies`);
otherwise it returns the split `(S_p, S_d)` and look-ahead `k` that maximise
`(useful_decode_tokens(k) + T_prefill) / max(k * t_d(S_d), t_p(S_p))` subject to `t_d(S_d) <= TBT`
(`useful_decode_tokens(k)` is `k * T_decode` capped by what each request can still emit). Beyond the
paper, it first looks only at `k >= t_p / TBT`, where the step's average time per decode token
`max(k t_d, t_p) / k` also meets the SLO (an average, as TPOT is: the k tokens come `t_d` apart and
then wait for the prefill, so the gap before the next step's first token is `t_p - (k-1) t_d`, which
exceeds TBT when `max_lookahead` caps k); only if no split allows that does it fall back to the
paper's constraint alone. No k passes the smallest k after which no request has tokens left to emit
(the requests end within it; further passes would be wasted). With no feasible split it keeps the
batch aggregated. Hysteresis: the
previous split stays unless the best one beats it by more than `margin` (relative); `k` is
re-chosen every step, it costs nothing to change.
Pure functions; time functions are passed in, so this module knows nothing of models or devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TimeFn = Callable[[int], float]  # predicted ms of one step on S SMs


@dataclass(frozen=True)
class Split:
    prefill_sms: int
    decode_sms: int


@dataclass(frozen=True)
class Choice:
    """A multiplexed step: the split, look-ahead `k`, its objective (tokens/ms) and phase times."""

    split: Split
    k: int
    objective: float
    prefill_ms: float
    decode_ms: float  # one decode step

    @property
    def step_ms(self) -> float:
        return max(self.k * self.decode_ms, self.prefill_ms)


def candidate_splits(total_sms: int, decode_sizes: Sequence[int]) -> list[Split]:
    """Decode takes a partition size, prefill the rest of the device."""
    return [Split(total_sms - d, d) for d in decode_sizes if 0 < d < total_sms]


def useful_decode_tokens(remaining: Sequence[int], max_k: int) -> list[float]:
    """Entry k: tokens k look-ahead steps can usefully emit, each request capped by its `remaining`."""
    short = [r for r in remaining if r < max_k]  # usually few: most requests outlast any look-ahead
    counts = [0] * (max_k + 1)
    for r in short:
        counts[r if r > 1 else 1] += 1
    counts[max_k] += len(remaining) - len(short)
    useful = [0.0] * (max_k + 1)
    below = 0.0  # sum of r over requests with r < k
    at_least = len(remaining)  # requests with r >= k
    for k in range(1, max_k + 1):
        useful[k] = below + k * at_least
        below += k * counts[k]
        at_least -= counts[k]
    return useful


def lookahead_used(useful: Sequence[float]) -> int:
    """The smallest k whose look-ahead emits every token the requests can still use (`useful[k]` no
    lower than at len(useful) - 1): passes beyond it produce nothing a request keeps."""
    top = useful[-1]
    return next(k for k in range(1, len(useful)) if useful[k] >= top)


def best_k(prefill_ms: float, decode_ms: float, prefill_tokens: float, useful: Sequence[float],
           k_min: int = 1) -> tuple[int, float]:
    """The look-ahead k_min..len(useful)-1 with the highest tokens/ms (the smallest k on ties)."""
    best, best_obj = k_min, -1.0
    for k in range(k_min, len(useful)):
        obj = (useful[k] + prefill_tokens) / max(k * decode_ms, prefill_ms, 1e-9)
        if obj > best_obj * (1 + 1e-12):
            best, best_obj = k, obj
    return best, best_obj


def optimize(
    splits: Sequence[Split],
    prefill_ms: TimeFn,
    decode_ms: TimeFn,
    prefill_tokens: float,
    useful: Sequence[float],
    tbt_ms: float,
    previous: Split | None = None,
    margin: float = 0.0,
) -> Choice | None:
    """The best feasible (split, k), sticky to `previous` within `margin`; None if none is feasible."""
    times = [(s, decode_ms(s.decode_sms)) for s in splits]
    feasible = [(s, td, prefill_ms(s.prefill_sms)) for s, td in times if td <= tbt_ms]
    max_k = len(useful) - 1
    enough = lookahead_used(useful)
    strict = [(s, td, tp, min(k, enough)) for s, td, tp in feasible
              if (k := max(1, math.ceil(tp / tbt_ms - 1e-9))) <= max_k]
    candidates = strict or [(s, td, tp, 1) for s, td, tp in feasible]
    best: Choice | None = None
    kept: Choice | None = None
    for split, td, tp, k_min in candidates:
        k, obj = best_k(tp, td, prefill_tokens, useful, k_min)
        choice = Choice(split, k, obj, tp, td)
        if best is None or obj > best.objective:
            best = choice
        if split == previous:
            kept = choice
    if kept is not None and best is not None and kept.objective * (1.0 + margin) >= best.objective:
        return kept
    return best


def decide(
    mixed_ms: float,
    budget_ms: float,
    splits: Sequence[Split],
    prefill_ms: TimeFn,
    decode_ms: TimeFn,
    prefill_tokens: float,
    useful: Sequence[float],
    previous: Split | None = None,
    margin: float = 0.0,
    tbt_ms: float | None = None,
) -> Choice | None:
    """None (run aggregated) if the mixed batch fits the step budget or no split is feasible, else
    the split. Multiplexed decode steps keep `tbt_ms` (the TBT SLO; the budget when not given)."""
    if mixed_ms <= budget_ms or not splits or prefill_tokens <= 0 or len(useful) < 2 or useful[1] <= 0:
        return None
    tbt = budget_ms if tbt_ms is None else tbt_ms
    return optimize(splits, prefill_ms, decode_ms, prefill_tokens, useful, tbt, previous, margin)
