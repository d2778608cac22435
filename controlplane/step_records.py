"""What the scheduler keeps of a step between planning it and applying its result, and what applying
a result hands the output processor.

`InflightStep`: a planned step's plan, the tokens it owes each sequence, and which of them it no
longer speaks for. `SeqUpdate`: what one step did to one sequence. Records only: the scheduler
fills and reads them; no scheduling here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from controlplane.policies import AGGREGATED, ModeDecision, StepForecast
from controlplane.sequence import Sequence
from shared.messages import StepPlan, TokenLogprobs


class SeqUpdate(msgspec.Struct):
    """What one step did to one sequence, for the output processor. Never sent anywhere: a Struct
    rather than a dataclass because the scheduler builds one per sequence per step, and a Struct
    is built in C (about 2.5x cheaper). `new_token_ids` may be the data plane's output list itself
    (not a copy): read it, do not change it."""

    seq: Sequence
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finished: bool


@dataclass
class InflightStep:
    plan: StepPlan
    expects_token: dict[int, int]  # scheduled seq id -> tokens the step samples for it (0: none)
    sent_at: float  # on the scheduler's SLO clock
    forecast: StepForecast | None = None
    decision: ModeDecision = AGGREGATED
    outstanding: int = 0  # tokens of expects_token not arrived yet
    num_tokens: int = 0  # tokens the plan schedules (what StepStats counts)
    # seq ids preempted since the step was planned (`Scheduler._preempt` adds them): what the step
    # computed for them is stale, and the tokens it owes them are no longer owed
    stale: set[int] = field(default_factory=set)
    # with prefix caching: each sequence the step computes other than as a noted decode (prompt
    # chunks, mostly), with its computed tokens once the step has run: what the result confirms
    chunked: list[tuple[Sequence, int]] = field(default_factory=list)
    # a plan sent with `masks_follow`: the structured outputs it samples for, whose token masks are still
    # to be sent (`Scheduler.token_masks_due`); None once sent, or for a plan that carries its masks
    masks_due: list[Sequence] | None = None
