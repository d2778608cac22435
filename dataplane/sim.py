"""A data plane that does no math: it keeps the same per-sequence bookkeeping as the real runner,
checks every plan as strictly, and answers with deterministic tokens.

It lets the whole control plane run (and be tested) without torch. It must not import torch and
must not decide anything: like the real worker it executes plans and reports facts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
import numpy as np

from dataplane.seq_state import SeqError, check_token_mask, fail_by_plan, masks_follow_problem
from shared.messages import (
    NewRequest, ScheduledSeq, SeqFailure, SeqOutput, StepPlan, StepResult, StepTimings, TokenMasks,
)


def sim_token(prompt_key: int, position: int, vocab_size: int) -> int:
    """The token a simulated model emits at `position`: a fixed function of the prompt, so the same
    request gets the same tokens under any batching. Ids below 16 (EOS-like) are never produced."""
    return 16 + (prompt_key * 104729 + position * 7919) % (vocab_size - 16)


def _allowed_ids(mask: bytes, vocab_size: int) -> np.ndarray:
    """The token ids a mask allows, ascending: only its nonzero bytes are unpacked (a grammar's mask is
    mostly zeros; unpacking all of a 150k-id vocabulary's bits every token would be the sim's main cost)."""
    raw = np.frombuffer(mask, dtype=np.uint8)
    nonzero = np.flatnonzero(raw)
    bits = np.unpackbits(raw[nonzero], bitorder="little").reshape(-1, 8).astype(bool)
    ids = (nonzero[:, None] * 8 + np.arange(8))[bits]
    return ids[ids < vocab_size]


def with_token_masks(plan: StepPlan, masks: TokenMasks) -> StepPlan:
    """A plan sent with `masks_follow` as if its entries had carried `masks` (what the simulated data plane
    runs once they come: the same checks as masks in the plan; one for a sequence not in it is ignored).
    The real runner's `apply_masks` gives the same outcome."""
    by_seq = {m.seq_id: m.mask for m in masks.masks}
    scheduled = [msgspec.structs.replace(e, token_mask=by_seq[e.seq_id]) if e.seq_id in by_seq else e
                 for e in plan.scheduled]
    return msgspec.structs.replace(plan, scheduled=scheduled, masks_follow=False)


@dataclass
class _SimSeq:
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int]
    prompt_key: int
    num_computed: int = 0


class SimRunner:
    """Executes StepPlans on bookkeeping alone; raises AssertionError-free, reports SeqFailures."""

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int, check_kv: bool = False) -> None:
        """`check_kv` (tests): keep which token each KV slot was computed for, and fail a sequence whose
        context slots hold other tokens (a block shared or reused wrongly)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv: dict[int, list[int | None]] | None = {} if check_kv else None
        self.seqs: dict[int, _SimSeq] = {}
        self.block_owner: dict[int, int] = {}  # block -> the sequence that writes its KV
        self.block_readers: dict[int, set[int]] = {}  # block -> sequences holding it as a cached prefix

    def execute(self, plan: StepPlan, masks: TokenMasks | None = None) -> StepResult:
        """Run `plan`; one whose masks follow runs with `masks` (none: every row unmasked), as the real
        runner's `execute`."""
        if plan.masks_follow and masks_follow_problem(plan) is None:  # else `fail_by_plan` fails it whole
            plan = with_token_masks(plan, masks or TokenMasks(step_id=plan.step_id))
        start = time.perf_counter()
        for seq_id in plan.finished_seq_ids:
            self._drop(seq_id)
        failures: list[SeqFailure] = []
        for new in plan.new_requests:
            problem = self._register(new)
            if problem:
                failures.append(SeqFailure(seq_id=new.seq_id, message=problem))
        outputs: list[SeqOutput] = []
        failed = fail_by_plan(plan, failures, self._drop)
        for entry in plan.scheduled:
            if entry.seq_id in failed:
                continue
            problem = self._extend(entry, plan.decode_steps) or self._check_context(entry.seq_id)
            if problem:
                self._drop(entry.seq_id)
                failures.append(SeqFailure(seq_id=entry.seq_id, message=problem))
                continue
            tokens = self._compute(entry, plan.decode_steps)
            if tokens:
                outputs.append(SeqOutput(seq_id=entry.seq_id, token_ids=tokens))
        elapsed = (time.perf_counter() - start) * 1000.0
        return StepResult(step_id=plan.step_id, outputs=outputs, failures=failures,
                          timings=StepTimings(total_ms=elapsed))

    def _drop(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            for block in seq.block_table:
                if self.block_owner.get(block) == seq_id:
                    del self.block_owner[block]
            self._drop_reader(seq_id, seq.block_table)

    def _share(self, seq_id: int, blocks: list[int]) -> str | None:
        """Hold `blocks` as a cached prefix: each must be whole in KV already (its writer, if still
        here, has computed past it)."""
        for block in blocks:
            if not 0 <= block < self.num_blocks:
                return f"seq {seq_id}: block id {block} outside the KV cache"
            owner = self.block_owner.get(block)
            if owner is not None:
                writer = self.seqs[owner]
                if (writer.block_table.index(block) + 1) * self.block_size > writer.num_computed:
                    return f"seq {seq_id}: cached block {block} is still being written by seq {owner}"
        for block in blocks:
            self.block_readers.setdefault(block, set()).add(seq_id)
        return None

    def _claim(self, seq_id: int, blocks: list[int]) -> str | None:
        for block in blocks:
            if not 0 <= block < self.num_blocks:
                return f"seq {seq_id}: block id {block} outside the KV cache"
            owner = self.block_owner.get(block)
            if owner is not None and owner != seq_id:
                return f"seq {seq_id}: block {block} is still held by seq {owner}"
            readers = self.block_readers.get(block, set()) - {seq_id}
            if readers:
                return f"seq {seq_id}: block {block} is a cached prefix of seq {min(readers)}"
        for block in blocks:
            self.block_owner[block] = seq_id
        return None

    def _register(self, new: NewRequest) -> str | None:
        self._drop(new.seq_id)
        if not new.token_ids or not 0 < new.num_prompt_tokens <= len(new.token_ids):
            return f"seq {new.seq_id}: bad token list"
        cached = new.num_computed_tokens
        if cached % self.block_size or not 0 <= cached < len(new.token_ids) \
                or cached > len(new.block_ids) * self.block_size:
            return f"seq {new.seq_id}: {cached} cached tokens are not whole blocks of its {len(new.token_ids)}"
        shared = cached // self.block_size
        problem = self._share(new.seq_id, new.block_ids[:shared]) or self._claim(new.seq_id, new.block_ids[shared:])
        if problem:
            self._drop_reader(new.seq_id, new.block_ids[:shared])
            return problem
        prompt = new.token_ids[: new.num_prompt_tokens]
        key = hash(tuple(prompt)) & 0xFFFFFFFF
        self.seqs[new.seq_id] = _SimSeq(list(new.token_ids), new.num_prompt_tokens, list(new.block_ids), key,
                                        num_computed=cached)
        return None

    def _drop_reader(self, seq_id: int, blocks: list[int]) -> None:
        for block in blocks:
            readers = self.block_readers.get(block)
            if readers is not None:
                readers.discard(seq_id)
                if not readers:
                    del self.block_readers[block]

    def _extend(self, entry: ScheduledSeq, decode_steps: int) -> str | None:
        seq = self.seqs.get(entry.seq_id)
        if seq is None:
            return f"seq {entry.seq_id}: unknown to the data plane"
        problem = self._claim(entry.seq_id, entry.new_block_ids)
        if problem:
            return problem
        seq.block_table.extend(entry.new_block_ids)
        end = seq.num_computed + entry.num_tokens
        if entry.num_tokens < 1 or end > len(seq.token_ids):
            return f"seq {entry.seq_id}: cannot compute {entry.num_tokens} tokens"
        decoding = entry.num_tokens == 1 and end == len(seq.token_ids)
        try:
            check_token_mask(entry, end == len(seq.token_ids), decoding and decode_steps > 1, self.vocab_size)
        except SeqError as exc:
            return str(exc)
        end += decode_steps - 1 if decoding else 0
        if end > len(seq.block_table) * self.block_size:
            return f"seq {entry.seq_id}: {len(seq.block_table)} blocks cannot hold {end} tokens"
        return None

    def _compute(self, entry: ScheduledSeq, decode_steps: int) -> list[int]:
        seq = self.seqs[entry.seq_id]
        decoding = entry.num_tokens == 1 and seq.num_computed + 1 == len(seq.token_ids)
        self._write_kv(seq, entry.num_tokens)
        seq.num_computed += entry.num_tokens
        if seq.num_computed < len(seq.token_ids):
            return []
        steps = decode_steps if decoding else 1
        tokens = []
        for step in range(steps):
            if step:
                self._write_kv(seq, 1)
                seq.num_computed += 1
            token = sim_token(seq.prompt_key, len(seq.token_ids), self.vocab_size)
            if entry.token_mask:  # structured output: the allowed token the simulated model's choice picks
                allowed = _allowed_ids(entry.token_mask, self.vocab_size)
                token = int(allowed[token % len(allowed)]) if len(allowed) else token
            seq.token_ids.append(token)
            tokens.append(token)
        return tokens

    def _write_kv(self, seq: _SimSeq, num_tokens: int) -> None:
        """With `check_kv`: the KV slots of the next `num_tokens` positions now hold their tokens."""
        if self.kv is None:
            return
        size = self.block_size
        for pos in range(seq.num_computed, seq.num_computed + num_tokens):
            slots = self.kv.setdefault(seq.block_table[pos // size], [None] * size)
            slots[pos % size] = seq.token_ids[pos]

    def _check_context(self, seq_id: int) -> str | None:
        """With `check_kv`: whether every computed position's KV slot holds that position's token."""
        if self.kv is None:
            return None
        seq, size = self.seqs[seq_id], self.block_size
        for pos in range(seq.num_computed):
            slots = self.kv.get(seq.block_table[pos // size])
            held = slots[pos % size] if slots is not None else None
            if held != seq.token_ids[pos]:
                return (f"seq {seq_id}: the KV of position {pos} (block {seq.block_table[pos // size]}) was "
                        f"computed for token {held}, not {seq.token_ids[pos]}")
        return None
