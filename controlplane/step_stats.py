"""Counters of what the scheduler ran: steps and busy time per mode, splits, look-ahead, mode switches,
steps with trimmed prompt chunks, steps whose token masks followed their plan, and the control plane's
own wall time between a result and the next plan.

A bounded timeline of recent steps feeds `duetserve simulate`'s report. Bookkeeping only: no policy.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import msgspec

from shared.messages import StepPlan, StepTimings


class StepRecord(msgspec.Struct, frozen=True):
    """One finished step (a Struct: one is built per step, in C)."""

    step_id: int
    mode: str
    prefill_sms: int
    decode_sms: int
    decode_steps: int
    num_tokens: int
    measured_ms: float


@dataclass
class StepStats:
    steps: Counter[str] = field(default_factory=Counter)
    busy_ms: Counter[str] = field(default_factory=Counter)
    splits: Counter[tuple[int, int]] = field(default_factory=Counter)
    lookahead: Counter[int] = field(default_factory=Counter)
    switches: int = 0
    trimmed: int = 0  # aggregated steps whose prompt chunks the policy cut to fit its step budget
    masks_followed: int = 0  # steps run with `masks_follow` (structured outputs, defer_token_masks)
    last_mode: str | None = None
    host_gap_s: float = 0.0  # wall time from a result to the next plan, over back-to-back steps
    host_gaps: int = 0
    timeline: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=20_000))

    def record(self, plan: StepPlan, timings: StepTimings, num_tokens: int) -> None:
        """Count one finished step; `num_tokens`: the tokens its plan scheduled (the scheduler's count)."""
        mode = plan.mode
        self.steps[mode] += 1
        self.busy_ms[mode] += timings.total_ms
        if mode == "multiplexed":
            self.splits[(plan.prefill_sms, plan.decode_sms)] += 1
            self.lookahead[plan.decode_steps] += 1
        if self.last_mode is not None and mode != self.last_mode:
            self.switches += 1
        self.last_mode = mode
        self.masks_followed += plan.masks_follow
        self.timeline.append(StepRecord(plan.step_id, mode, plan.prefill_sms, plan.decode_sms, plan.decode_steps,
                                        num_tokens, timings.total_ms))

    def summary(self) -> dict[str, object]:
        return {
            "steps": dict(self.steps),
            "busy_ms": {k: round(v, 3) for k, v in self.busy_ms.items()},
            "mode_switches": self.switches,
            "trimmed_steps": self.trimmed,
            "masks_follow_steps": self.masks_followed,
            "splits": {f"{p}+{d}": n for (p, d), n in self.splits.most_common()},
            "lookahead": {str(k): n for k, n in sorted(self.lookahead.items())},
            "control_plane_ms_per_step": 1e3 * self.host_gap_s / self.host_gaps if self.host_gaps else 0.0,
        }
