"""Continuous batching with chunked prefill: builds each StepPlan and applies each StepResult.

Policy (vLLM-style, decode first): every running sequence that decodes gets one token, then
running sequences in prefill continue their chunks, then waiting sequences are admitted in
arrival order while the step's token budget, `max_num_seqs` and free KV blocks allow. When a
running sequence needs a block and none is free, the most recently admitted sequence is preempted
(its blocks freed, recomputed later). The scheduler is synchronous and does no I/O.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from controlplane.kv_blocks import BlockAllocator
from controlplane.sequence import FinishReason, Sequence, SeqStatus, check_token_stop
from shared.config import SchedulerConfig
from shared.messages import NewRequest, ScheduledSeq, StepPlan, StepResult, TokenLogprobs


@dataclass
class SeqUpdate:
    """What one step did to one sequence, for the output processor."""

    seq: Sequence
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finished: bool


@dataclass
class _StepDraft:
    budget: int
    tokens: dict[int, int] = field(default_factory=dict)  # seq id -> tokens scheduled
    new_blocks: dict[int, list[int]] = field(default_factory=dict)
    preempted: bool = False


@dataclass
class InflightStep:
    plan: StepPlan
    expects_token: dict[int, bool]
    sent_at: float


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        allocator: BlockAllocator,
        max_model_len: int,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.config = config
        self.allocator = allocator
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self.inflight: InflightStep | None = None
        self._dropped_on_worker: list[int] = []
        self._next_step_id = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------------ requests in and out

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self.seqs:
            raise ValueError(f"seq {seq.seq_id} already scheduled")
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def finish(self, seq_id: int, reason: FinishReason, stop_reason: str | None = None) -> Sequence | None:
        """End a sequence now (stop, abort, error): free its blocks, tell the worker next step."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        return seq

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.seq_id, seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        if seq.on_worker:
            self._dropped_on_worker.append(seq.seq_id)
            seq.on_worker = False

    # ------------------------------------------------------------------ building a step

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to run (and nothing to drop)."""
        if self.inflight is not None:
            raise RuntimeError("schedule() called while a step is in flight")
        draft = _StepDraft(budget=self.config.max_num_batched_tokens)
        decoding = [s for s in self.running if s.is_decoding]
        prefilling = [s for s in self.running if not s.is_decoding]
        for seq in decoding + prefilling:
            if draft.budget == 0:
                break
            if seq.status is SeqStatus.RUNNING:
                self._schedule_running(seq, draft)
        if not draft.preempted:
            self._admit_waiting(draft)
        if not draft.tokens and not self._dropped_on_worker:
            return None
        return self._build_plan(draft)

    def _schedule_running(self, seq: Sequence, draft: _StepDraft) -> None:
        num_tokens = min(seq.num_uncomputed_tokens, draft.budget)
        if num_tokens <= 0:
            return
        need = self.allocator.blocks_for_tokens(seq.num_computed_tokens + num_tokens) - len(seq.block_ids)
        while need > self.allocator.num_free:
            victim = self.running[-1]
            self._preempt(victim, draft)
            if victim is seq:
                return
        if need > 0:
            blocks = self.allocator.allocate(seq.seq_id, need)
            seq.block_ids.extend(blocks)
            draft.new_blocks[seq.seq_id] = blocks
        draft.tokens[seq.seq_id] = num_tokens
        draft.budget -= num_tokens

    def _preempt(self, victim: Sequence, draft: _StepDraft) -> None:
        draft.preempted = True
        draft.budget += draft.tokens.pop(victim.seq_id, 0)
        draft.new_blocks.pop(victim.seq_id, None)
        self.running.remove(victim)
        self._release(victim)
        victim.status = SeqStatus.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def _admit_waiting(self, draft: _StepDraft) -> None:
        while self.waiting and draft.budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_tokens = min(seq.num_tokens, draft.budget)
            need = self.allocator.blocks_for_tokens(num_tokens)
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.block_ids = self.allocator.allocate(seq.seq_id, need)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            draft.tokens[seq.seq_id] = num_tokens
            draft.budget -= num_tokens

    def _build_plan(self, draft: _StepDraft) -> StepPlan:
        new_requests: list[NewRequest] = []
        scheduled: list[ScheduledSeq] = []
        expects: dict[int, bool] = {}
        for seq_id, num_tokens in draft.tokens.items():
            seq = self.seqs[seq_id]
            if not seq.on_worker:
                new_requests.append(
                    NewRequest(
                        seq_id=seq_id,
                        token_ids=seq.all_token_ids(),
                        num_prompt_tokens=seq.num_prompt_tokens,
                        block_ids=list(seq.block_ids),
                        sampling=seq.sampling,
                    )
                )
                seq.on_worker = True
                scheduled.append(ScheduledSeq(seq_id=seq_id, num_tokens=num_tokens))
            else:
                blocks = draft.new_blocks.get(seq_id, [])
                scheduled.append(ScheduledSeq(seq_id=seq_id, num_tokens=num_tokens, new_block_ids=blocks))
            seq.num_computed_tokens += num_tokens
            expects[seq_id] = seq.num_computed_tokens == seq.num_tokens
        plan = StepPlan(
            step_id=self._next_step_id,
            new_requests=new_requests,
            scheduled=scheduled,
            finished_seq_ids=self._dropped_on_worker,
        )
        self._next_step_id += 1
        self._dropped_on_worker = []
        self.inflight = InflightStep(plan=plan, expects_token=expects, sent_at=time.monotonic())
        return plan

    # ------------------------------------------------------------------ applying a result

    def update(self, result: StepResult) -> list[SeqUpdate]:
        """Apply the worker's answer to the in-flight step; returns per-sequence changes."""
        inflight = self.inflight
        if inflight is None or result.step_id != inflight.plan.step_id:
            raise RuntimeError(f"result for step {result.step_id} does not match the step in flight")
        self.inflight = None
        updates: list[SeqUpdate] = []
        answered: set[int] = set()
        for failure in result.failures:
            answered.add(failure.seq_id)
            seq = self.seqs.get(failure.seq_id)
            if seq is not None:
                seq.on_worker = False  # the worker dropped it already
                seq.error = failure.message
                self.finish(seq.seq_id, FinishReason.ERROR)
                updates.append(SeqUpdate(seq, [], None, True))
        for output in result.outputs:
            answered.add(output.seq_id)
            seq = self.seqs.get(output.seq_id)
            if seq is not None and inflight.expects_token.get(output.seq_id):
                updates.append(self._append_tokens(seq, output.token_ids, output.logprobs))
        for seq_id, expects in inflight.expects_token.items():
            seq = self.seqs.get(seq_id)
            if expects and seq_id not in answered and seq is not None:
                seq.error = f"the data plane returned no token for seq {seq_id} in step {result.step_id}"
                self.finish(seq_id, FinishReason.ERROR)
                updates.append(SeqUpdate(seq, [], None, True))
        return updates

    def _append_tokens(
        self, seq: Sequence, token_ids: list[int], logprobs: list[TokenLogprobs] | None
    ) -> SeqUpdate:
        accepted: list[int] = []
        for i, token_id in enumerate(token_ids):
            seq.output_token_ids.append(token_id)
            if logprobs is not None and i < len(logprobs):
                seq.output_logprobs.append(logprobs[i])
            accepted.append(token_id)
            if i > 0:  # look-ahead: the worker computed the previous sampled token too
                seq.num_computed_tokens += 1
            stop = check_token_stop(seq, token_id, self.eos_token_ids, self.max_model_len)
            if stop is not None:
                self.finish(seq.seq_id, stop[0], stop[1])
                break
        new_logprobs = logprobs[: len(accepted)] if logprobs is not None else None
        return SeqUpdate(seq, accepted, new_logprobs, seq.is_finished)

    def check_invariants(self) -> None:
        live = {s.seq_id: s.block_ids for s in self.seqs.values()}
        self.allocator.check_invariants(live)
        for seq in self.running:
            assert seq.status is SeqStatus.RUNNING
            need = self.allocator.blocks_for_tokens(seq.num_computed_tokens)
            assert len(seq.block_ids) >= need, f"seq {seq.seq_id} has too few blocks"
        for seq in self.waiting:
            assert seq.status is SeqStatus.WAITING and not seq.block_ids
