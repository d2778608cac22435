"""A step being composed: the tokens each scheduled sequence gets, the blocks given to it for them,
the batch as policies see it, each sequence's plan entry, and how the draft is cut when a policy
keeps fewer prompt tokens than were drafted.

The scheduler owns the draft and the queues; these functions only edit what they are handed. No
policy, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice

import msgspec

from controlplane.policies import BatchShape
from controlplane.prefix_cache import Allocator
from controlplane.sequence import SeqStatus, Sequence
from controlplane.waiting_queue import WaitingQueue
from shared.messages import NewRequest, ScheduledSeq


@dataclass(slots=True)
class StepDraft:
    budget: int
    tokens: dict[int, int] = field(default_factory=dict)  # seq id -> tokens scheduled
    new_blocks: dict[int, list[int]] = field(default_factory=dict)  # seq id -> blocks this step gave it
    preempted: bool = False
    # The decode items of the decode-first pass, in order (the first entries of `tokens`), with each
    # one's cached tokens: what BatchShape reads of them, noted by the pass, which reads those
    # counts anyway. Void once `preempted` (a victim may be one).
    decoders: list[Sequence] = field(default_factory=list)
    decode_contexts: list[int] = field(default_factory=list)

    def noted_decoders(self) -> list[Sequence]:
        """The decode items the decode pass noted (the first entries of `tokens`), unless voided."""
        return self.decoders if not self.preempted else []


def decode_left(seq: Sequence, total: int) -> int:
    """Tokens a decode item holding `total` tokens may still emit, at least 1: what its token cap
    (`max_tokens` or the model's length, whichever ends it first) leaves."""
    left = seq._token_cap - total
    return left if left > 1 else 1


def batch_shape(draft: StepDraft, seqs: dict[int, Sequence], remaining_too: bool = True,
                now: float | None = None) -> tuple[BatchShape, list[Sequence]]:
    """The drafted batch as policies see it, and its decode items' sequences: the decode pass's items
    as it noted them (unless a preemption voided them), then the rest of the draft, walked.
    `remaining_too` fills `decode_remaining` (for a policy that reads it). `now` (the SLO clock;
    None: not asked for) adds what a TPOT-aware policy reads of each decode item: its tokens so far
    and the time since its first token (none yet: it arrives with the steps in flight, no time has
    passed on its clock); `ahead_ms` is the caller's."""
    batch = BatchShape()
    items: Iterable[tuple[int, int]] = draft.tokens.items()
    decoders = list(draft.noted_decoders())  # a copy: the draft's list stays the noted ones
    if decoders:  # the shape takes the noted counts over (the draft does not read them again)
        batch.decode_contexts = draft.decode_contexts
        if remaining_too:  # decode_left(seq, c + 1), one comprehension
            batch.decode_remaining = [left if (left := seq._token_cap - c - 1) > 1 else 1
                                      for seq, c in zip(decoders, draft.decode_contexts)]
        items = islice(items, len(decoders), None)
    contexts, remaining, chunks = batch.decode_contexts, batch.decode_remaining, batch.chunks
    slack = now is not None
    t = now or 0.0
    if slack and decoders:  # one comprehension each: a TPOT-aware policy reads them for every decode item
        batch.decode_outputs = [len(seq.output_token_ids) + seq.num_inflight for seq in decoders]
        batch.decode_age_ms = [(t - seq.first_token_at) * 1e3 if seq.first_token_at else 0.0 for seq in decoders]
    outputs, ages = batch.decode_outputs, batch.decode_age_ms
    for seq_id, num_tokens in items:
        seq = seqs[seq_id]
        cached = seq.num_computed_tokens
        num_out = len(seq.output_token_ids) + seq.num_inflight  # Sequence.num_outputs, inlined
        total = seq._num_prompt + num_out
        if num_tokens == 1 and cached + 1 == total:  # the data plane's definition of a decode item
            decoders.append(seq)
            contexts.append(cached)
            if remaining_too:
                remaining.append(decode_left(seq, total))
            if slack:
                outputs.append(num_out)
                ages.append((t - seq.first_token_at) * 1e3 if seq.first_token_at else 0.0)
        else:
            chunks.append((num_tokens, cached, cached + num_tokens == total))
    return batch, decoders


def trim_draft(draft: StepDraft, cap: int, seqs: dict[int, Sequence], allocator: Allocator,
               running: list[Sequence], waiting: WaitingQueue) -> None:
    """Cut the draft's prefill chunks to `cap` tokens, from the last back (as `policies.trim_chunks`
    does): a cut chunk gives back the blocks this step gave it; a sequence admitted this step that
    keeps nothing goes back to the front of the queue."""
    left, cuts = cap, []
    for seq_id, n in draft.tokens.items():
        seq = seqs[seq_id]
        if n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens:
            continue  # a decode item
        keep = n if n <= left else left
        left -= keep
        if keep < n:
            cuts.append((seq, keep))
    for seq, keep in reversed(cuts):
        sid = seq.seq_id
        need = allocator.blocks_for_tokens(seq.num_computed_tokens + keep)
        if not seq.on_worker:  # admitted by this draft: every block it holds is this step's
            if keep == 0:
                del draft.tokens[sid]
                allocator.free(sid, seq.block_ids)
                seq.forget_blocks()  # a prefix-cache hit is looked up again at its next admission,
                if not seq.num_preemptions:  # which sets the reported count only for a first one
                    seq.num_cached_tokens = 0
                running.remove(seq)
                seq.status = SeqStatus.WAITING
                waiting.appendleft(seq)
                continue
            extra = seq.block_ids[need:]
        else:
            new = draft.new_blocks.get(sid, [])
            n_extra = min(len(seq.block_ids) - need, len(new))
            extra = new[len(new) - n_extra:] if n_extra > 0 else []
            if extra:
                draft.new_blocks[sid] = new[: len(new) - n_extra]
        if extra:
            allocator.free(sid, extra)
            del seq.block_ids[len(seq.block_ids) - len(extra):]
        if keep:
            draft.tokens[sid] = keep
        else:
            del draft.tokens[sid]
            draft.new_blocks.pop(sid, None)


def plan_entry(seq: Sequence, num_tokens: int, new_blocks: dict[int, list[int]],
               new_requests: list[NewRequest]) -> ScheduledSeq:
    """`seq`'s entry in the plan (`num_tokens` of it, the blocks the draft gave it); a sequence the worker
    holds no state for is sent whole first (appended to `new_requests`, and marked as held)."""
    seq_id = seq.seq_id
    if not seq.on_worker:
        sampling = seq.sampling
        if seq.prompt_logprobs is not None and not seq.needs_prompt_logprobs:  # a recompute: held already
            sampling = msgspec.structs.replace(sampling, prompt_logprobs=None)
        new_requests.append(NewRequest(seq_id=seq_id, token_ids=seq.all_token_ids(),
                                       num_prompt_tokens=seq.num_prompt_tokens, block_ids=list(seq.block_ids),
                                       sampling=sampling, num_computed_tokens=seq.num_computed_tokens))
        seq.on_worker = True
        return ScheduledSeq(seq_id=seq_id, num_tokens=num_tokens)
    blocks = new_blocks.get(seq_id)
    if blocks is not None:
        return ScheduledSeq(seq_id=seq_id, num_tokens=num_tokens, new_block_ids=blocks)
    return seq._one_token_entry if num_tokens == 1 else ScheduledSeq(seq_id=seq_id, num_tokens=num_tokens)
