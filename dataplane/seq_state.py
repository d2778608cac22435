"""The data plane's per-sequence state and the checks every plan item must pass.

A failed check is a SeqError, reported to the control plane as that sequence's SeqFailure. This
module holds no tensors and decides nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shared.messages import NewRequest, SamplingParams, ScheduledSeq, SeqFailure, StepPlan


class SeqError(ValueError):
    """A plan item this worker cannot run; becomes a SeqFailure for that sequence."""


@dataclass
class SeqState:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int]
    sampling: SamplingParams
    num_computed: int = 0
    num_inflight: int = 0  # tokens sampled on the device whose step's result is not collected yet
    token_mask: bytes = b""  # this step's structured-output mask for its sampled token (b"": none)

    @property
    def num_known(self) -> int:
        """Tokens the sequence has, counting sampled ones not yet copied to the host."""
        return len(self.token_ids) + self.num_inflight

    @property
    def num_generated(self) -> int:
        return self.num_known - self.num_prompt_tokens

    def is_decode(self, num_tokens: int) -> bool:
        """This step computes only the last token (a decode, which may look ahead)."""
        return num_tokens == 1 and self.num_computed + 1 == self.num_known


def check_blocks(seq_id: int, blocks: list[int], num_blocks: int) -> None:
    bad = next((b for b in blocks if not 0 <= b < num_blocks), None)
    if bad is not None:
        raise SeqError(f"seq {seq_id}: block id {bad} outside the KV cache ({num_blocks} blocks)")


def new_state(new: NewRequest, vocab_size: int, num_blocks: int) -> SeqState:
    if not new.token_ids:
        raise SeqError(f"seq {new.seq_id}: no tokens")
    bad = next((t for t in new.token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise SeqError(f"seq {new.seq_id}: token id {bad} outside the vocabulary (size {vocab_size})")
    if not 0 < new.num_prompt_tokens <= len(new.token_ids):
        raise SeqError(f"seq {new.seq_id}: num_prompt_tokens {new.num_prompt_tokens} is inconsistent")
    check_blocks(new.seq_id, new.block_ids, num_blocks)
    rules = [t for t, _ in new.sampling.logit_bias] + list(new.sampling.allowed_token_ids)
    bad = next((t for t in rules if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise SeqError(f"seq {new.seq_id}: token id {bad} of its logit_bias or allowed_token_ids is outside the "
                       f"vocabulary (size {vocab_size})")
    if not 0 <= new.num_computed_tokens < len(new.token_ids):
        raise SeqError(f"seq {new.seq_id}: num_computed_tokens {new.num_computed_tokens} is not below its "
                       f"{len(new.token_ids)} tokens")
    return SeqState(
        seq_id=new.seq_id, token_ids=list(new.token_ids), num_prompt_tokens=new.num_prompt_tokens,
        block_table=list(new.block_ids), sampling=new.sampling, num_computed=new.num_computed_tokens,
    )


def plan_failures(plan: StepPlan) -> dict[int, str]:
    """The scheduled sequences a plan-level rule fails, with why: a plan of fewer than one decode step
    fails all of them, and so does a plan whose token masks follow but which is not one aggregated pass
    with no masks of its own (`masks_follow_problem`); a sequence listed twice fails (each entry would be
    checked against the same state, then both run). The rest of the plan runs; these end as SeqFailures,
    never as a fatal error."""
    if plan.decode_steps < 1:
        return {e.seq_id: f"seq {e.seq_id}: the plan asks for {plan.decode_steps} decode steps (at least 1)"
                for e in plan.scheduled}
    problem = masks_follow_problem(plan)
    if problem is not None:
        return {e.seq_id: f"seq {e.seq_id}: {problem}" for e in plan.scheduled}
    seen: set[int] = set()
    twice: dict[int, str] = {}
    for entry in plan.scheduled:
        if entry.seq_id in seen:
            twice[entry.seq_id] = f"seq {entry.seq_id}: scheduled more than once in step {plan.step_id}"
        seen.add(entry.seq_id)
    return twice


def fail_by_plan(plan: StepPlan, failures: list[SeqFailure], drop: Callable[[int], None]) -> set[int]:
    """Add `plan_failures` to `failures` (a sequence already failed once is not again), dropping each
    sequence's state with `drop`; returns every failed sequence id."""
    failed = {f.seq_id for f in failures}
    for seq_id, message in plan_failures(plan).items():
        if seq_id not in failed:
            drop(seq_id)
            failures.append(SeqFailure(seq_id=seq_id, message=message))
            failed.add(seq_id)
    return failed


def check_scheduled(
    seqs: dict[int, SeqState], entry: ScheduledSeq, decode_steps: int, block_size: int, num_blocks: int,
    max_positions: int | None = None,
) -> SeqState:
    """Apply the entry's new blocks and check the step fits; returns the sequence's state.
    `max_positions`: the model's positions (its RoPE table); no token of the step may sit past them."""
    state = seqs.get(entry.seq_id)
    if state is None:
        raise SeqError(f"seq {entry.seq_id}: unknown to the data plane")
    check_blocks(entry.seq_id, entry.new_block_ids, num_blocks)
    state.block_table.extend(entry.new_block_ids)
    end = state.num_computed + entry.num_tokens
    if entry.num_tokens < 1 or end > state.num_known:
        raise SeqError(
            f"seq {entry.seq_id}: cannot compute {entry.num_tokens} tokens "
            f"({state.num_computed} of {state.num_known} done)"
        )
    if entry.num_tokens > 1 and end > len(state.token_ids):  # only a decode reads a token still on the GPU
        raise SeqError(f"seq {entry.seq_id}: a {entry.num_tokens}-token chunk reaches tokens not sampled yet")
    lookahead = decode_steps - 1 if state.is_decode(entry.num_tokens) else 0
    if end + lookahead > len(state.block_table) * block_size:
        raise SeqError(f"seq {entry.seq_id}: {len(state.block_table)} blocks cannot hold {end + lookahead} tokens")
    if max_positions is not None and end + lookahead > max_positions:
        raise SeqError(f"seq {entry.seq_id}: a step to position {end + lookahead - 1} passes the model's "
                       f"{max_positions} positions")
    return state


def mask_bytes(vocab_size: int) -> int:
    """The size of a token mask: one bit per vocabulary entry, in whole 32-bit words."""
    return 4 * ((vocab_size + 31) // 32)


def check_token_mask(entry: ScheduledSeq, samples: bool, looks_ahead: bool, vocab_size: int) -> None:
    """An entry's token mask (checked before the step computes): the right size, on an item that samples
    (`samples`), and one token's worth (not on a decode the plan runs look-ahead passes of)."""
    mask = entry.token_mask
    if not mask:
        return
    if len(mask) != mask_bytes(vocab_size):
        raise SeqError(f"seq {entry.seq_id}: a token mask of {len(mask)} bytes; the vocabulary of {vocab_size} "
                       f"needs {mask_bytes(vocab_size)}")
    if not samples:
        raise SeqError(f"seq {entry.seq_id}: a token mask on a chunk that samples no token")
    if looks_ahead:
        raise SeqError(f"seq {entry.seq_id}: a token mask covers one token, but the plan decodes ahead")


def masks_follow_problem(plan: StepPlan) -> str | None:
    """Why a plan whose token masks follow cannot run so (None: it can): its sampling is held back for one
    aggregated pass (not a look-ahead chain or a multiplexed pair of streams), and its masks come in the
    TokenMasks message, not in its entries."""
    if not plan.masks_follow:
        return None
    if plan.decode_steps != 1 or plan.mode != "aggregated":
        return (f"step {plan.step_id}'s token masks follow, so it runs one aggregated pass, not {plan.mode} with "
                f"{plan.decode_steps} decode steps")
    if any(e.token_mask for e in plan.scheduled):
        return f"step {plan.step_id}'s token masks follow it, yet an entry carries one"
    return None
