"""A step being composed: the tokens each scheduled sequence gets, the blocks given to it for them,
and how the draft is cut when a policy keeps fewer prompt tokens than were drafted.

The scheduler owns the draft and the queues; these functions only edit what they are handed. No
policy, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from controlplane.kv_blocks import BlockAllocator
from controlplane.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class StepDraft:
    budget: int
    tokens: dict[int, int] = field(default_factory=dict)  # seq id -> tokens scheduled
    new_blocks: dict[int, list[int]] = field(default_factory=dict)  # seq id -> blocks this step gave it
    preempted: bool = False


def trim_draft(draft: StepDraft, cap: int, seqs: dict[int, Sequence], allocator: BlockAllocator,
               running: list[Sequence], waiting: deque[Sequence]) -> None:
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
                seq.block_ids = []
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
