"""Continuous batching with chunked prefill: builds each StepPlan and applies each StepResult.

Composition is the policy's (see `policies`): decode-first (every running sequence that decodes
gets one token, then running prefills continue their chunks, then waiting sequences are admitted
in arrival order while the token budget, `max_num_seqs` and free KV blocks allow) or
prefill-first. The policy then picks the mode: aggregated, or multiplexed with a split and a
look-ahead `k`, for which the scheduler reserves the KV blocks of the `k` decode tokens up front
(lowering `k` if blocks are short). When a running sequence needs a block and none is free, the
most recently admitted sequence is preempted (its blocks freed, recomputed later). Under
`scheduling_policy="priority"` the queue is ordered by (priority, arrival) and so is `running`,
whose last -- the lowest-priority, latest-arrived sequence -- a preemption takes. Measured step
times feed the predictor's online correction. The scheduler is synchronous and does no I/O.

With a `PrefixCachingAllocator` a waiting sequence is admitted with the cached blocks its tokens
start with (at least its last token is computed, so the step samples), and a sequence's full
blocks are registered once a result has confirmed their KV: a chunk's when its step's result
arrives, the blocks of its generated tokens when it is released (each output that arrived confirms
the KV before it) -- never what a step still in flight computes, never after an error.

With `async_scheduling` a second step may be planned while the first is in flight: a sequence
that step will sample for counts that token as known-but-unseen (`Sequence.num_inflight`) and
decodes it next (the data plane feeds it from the GPU). Stops are applied when results arrive, so
a sequence may compute one token past its end, which is dropped. Sequences with penalties (which
need every previous token on the host) and ones sure to end at length wait for their results.

Structured outputs: a sequence with a grammar has the bitmask of the tokens it may sample next in the
plan entry of each step that samples for it, and a step with such a decode looks no step ahead. While a
step in flight samples for one, with `defer_token_masks` the next step is planned at once, with
`masks_follow` (aggregated: as the policy would run it so), and its masks (`token_masks_due`) go out
when the token is back, before any later plan; without it, or with penalties on such a sequence, no
step is planned (so it decodes every step, the steps one at a time).
"""

from __future__ import annotations

import time
from bisect import insort
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from itertools import islice

from controlplane import prefix_sharing
from controlplane.policies import (
    AGGREGATED, BatchShape, ModeDecision, StepForecast, aggregated_decision, make_policy, make_predictor,
)
from controlplane.prefix_cache import Allocator, PrefixCachingAllocator
from controlplane.sequence import FinishReason, SeqStatus, Sequence
from controlplane.step_draft import StepDraft, batch_shape, plan_entry, trim_draft
from controlplane.step_outcomes import StepOutcomes
from controlplane.step_records import InflightStep
from controlplane.step_stats import StepStats
from controlplane.structured_output import add_token_masks, deferred_token_masks
from controlplane.waiting_queue import PriorityWaitingQueue, WaitingQueue, priority_key
from shared.config import SchedulerConfig
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan, TokenMasks, WorkerReady


class Scheduler(StepOutcomes):
    """Plans steps (this module) and applies their answers (`step_outcomes.StepOutcomes`)."""

    def __init__(
        self,
        config: SchedulerConfig,
        allocator: Allocator,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        worker: WorkerReady | None = None,
    ) -> None:
        """`worker` (the handshake's answer) gives the policy its device, partitions and profile."""
        self.config = config
        self.policy = make_policy(config, worker)
        self.predictor = make_predictor(worker)
        self.stats = StepStats()
        self._result_at: float | None = None  # when the last result arrived, for StepStats.host_gap_s
        self.allocator = allocator
        self.cache = allocator if isinstance(allocator, PrefixCachingAllocator) else None
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self._by_priority = config.scheduling_policy == "priority"
        self.waiting: WaitingQueue = PriorityWaitingQueue() if self._by_priority else deque()
        # admission order under fcfs; by `priority_key` under priority, so that a preemption, which
        # takes the last, takes the lowest-priority, latest-arrived sequence
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self.inflight: deque[InflightStep] = deque()
        self.max_inflight = 2 if config.async_scheduling else 1
        self.defer_masks = config.defer_token_masks and self.max_inflight > 1
        self._dropped_on_worker: list[int] = []
        self._structured: set[int] = set()  # live sequences with a structured output (a grammar)
        self._next_step_id = 0
        self.num_preemptions = 0
        # SLO bookkeeping (first-token times, the steps in flight, the pace of decode tokens) runs on
        # the clients' timeline; `duetserve simulate` rescales it when the data plane runs faster
        self.slo_clock: Callable[[], float] = time.monotonic
        self._wants_slack = bool(getattr(self.policy, "wants_slack", False))
        self._wants_remaining = bool(getattr(self.policy, "wants_remaining", True))

    # ------------------------------------------------------------------ requests in and out

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self.seqs:
            raise ValueError(f"seq {seq.seq_id} already scheduled")
        seq.set_limits(self.max_model_len, self.eos_token_ids)
        if seq.sampling.prompt_logprobs is not None and seq.prompt_logprobs is None:
            seq.prompt_logprobs = []
        self.seqs[seq.seq_id] = seq
        if seq.grammar is not None:
            self._structured.add(seq.seq_id)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def last_predicted_ms(self) -> float | None:
        """The predicted time of the step planned last (what the observer scores the predictor by):
        the policy's own prediction, else the predictor's for an aggregated step; None without one."""
        if not self.inflight:
            return None
        step = self.inflight[-1]
        if step.decision.predicted_ms > 0:
            return step.decision.predicted_ms
        if step.forecast is None or step.decision.mode != "aggregated" or step.forecast.mixed.empty:
            return None
        return step.forecast.mixed_ms()

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; returns the blocks dropped from the index. ValueError when
        prefix caching is off."""
        if self.cache is None:
            raise ValueError("prefix caching is off on this server (started with --no-enable-prefix-caching)")
        return self.cache.reset()

    def finish(self, seq_id: int, reason: FinishReason, stop_reason: str | None = None) -> Sequence | None:
        """End a sequence now (stop, abort, error): free its blocks, tell the worker next step."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        self._structured.discard(seq_id)
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq, keep_kv=reason is not FinishReason.ERROR)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        return seq

    def _release(self, seq: Sequence, keep_kv: bool = True) -> None:
        """Free the sequence's blocks; with prefix caching and `keep_kv` its full computed blocks are
        registered first (an error may have left their KV unwritten)."""
        if self.cache is not None and keep_kv:
            prefix_sharing.register_confirmed(self.cache, seq)
        self.allocator.free(seq.seq_id, seq.block_ids)
        seq.forget_blocks()
        if seq.on_worker:
            self._dropped_on_worker.append(seq.seq_id)
            seq.on_worker = False

    # ------------------------------------------------------------------ building a step

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to run (and nothing to drop), or -- a
        step in flight samples a structured output's token -- nothing to run before its result: that
        sequence's next mask needs the token, and a step planned now would leave it out (it would decode
        every other step), so the steps go one at a time while one is running. With `defer_masks` that
        step is planned (its masks follow) unless such a sequence has penalties, but none after it before
        its masks are out."""
        if len(self.inflight) >= self.max_inflight:
            raise RuntimeError(f"schedule() called with {len(self.inflight)} steps in flight")
        if any(step.masks_due is not None for step in self.inflight):
            return None  # a plan must not overtake the masks of the one before it
        ahead = [self.seqs[i] for i in self._structured if self.seqs[i].num_inflight] if self.inflight else []
        if ahead and (not self.defer_masks or any(_penalised(s.sampling) for s in ahead)):
            return None
        draft = StepDraft(budget=self.config.max_num_batched_tokens)
        if self.policy.composition == "prefill_first":
            self._compose_prefill_first(draft)
        else:
            self._compose_decode_first(draft)
        if not draft.tokens:
            self._result_at = None  # idle: the next gap is not the control plane's time
            return self._build_plan(draft, AGGREGATED, None) if self._dropped_on_worker else None
        batch, decoders = self._batch_shape(draft)
        forecast = StepForecast(self.predictor, batch) if self.predictor is not None else None
        decision = self.policy.decide(batch, forecast)
        if ahead and decision.mode != "aggregated" and any(s.seq_id in draft.tokens for s in ahead):
            decision = aggregated_decision(self.policy, batch, forecast)  # its masks follow: one aggregated pass
        if decision.prefill_tokens is not None and decision.prefill_tokens < batch.prefill_tokens:
            self.stats.trimmed += 1
            trim_draft(draft, decision.prefill_tokens, self.seqs, self.allocator, self.running, self.waiting)
            if forecast is not None:  # the decode items are the same; the chunks are cut as the draft was
                forecast = forecast.trimmed(decision.prefill_tokens)
        if decision.decode_steps > 1:
            decision = self._reserve_lookahead(draft, decoders, decision)
        return self._build_plan(draft, decision, forecast)

    def token_masks_due(self) -> TokenMasks | None:
        """The masks of the oldest step in flight if it was planned with `masks_follow` and they are not
        sent yet (the steps before it have answered, so its structured outputs' tokens are all in); the
        caller sends them before the next plan."""
        step = self.inflight[0] if self.inflight else None
        if step is None or step.masks_due is None:
            return None
        masks = deferred_token_masks(step.plan.step_id, step.masks_due, self.seqs, step.stale)
        step.masks_due = None
        return masks

    def _compose_decode_first(self, draft: StepDraft) -> None:
        """Every decode in running order, then the running prefills' chunks, then waiting sequences.

        One pass over the running sequences schedules the common decodes inline (one token that fits
        the sequence's last block, or that starts a new block while one is free: none of
        `_schedule_running`'s arithmetic), notes each decode item for the batch shape
        (`StepDraft.decoders`) and sets the prefills aside; a decode whose blocks are short takes
        the general path, which may preempt from the end of `running`. The pass walks `running`
        itself, not a copy: a preemption removes sequences from its end, back to the current one at
        most, so the walk just ends sooner and never meets a preempted sequence."""
        prefilling: list[Sequence] = []
        allocator, tokens, new_blocks = self.allocator, draft.tokens, draft.new_blocks
        size = allocator.block_size
        decoders, contexts = draft.decoders, draft.decode_contexts
        budget = draft.budget  # a local in the loop; `draft.budget` is synced around the general path
        for seq in self.running:
            inflight = seq.num_inflight
            out = len(seq.output_token_ids) + inflight
            computed = seq.num_computed_tokens
            if not out or computed != seq._num_prompt + out - 1:  # not Sequence.is_decoding (inlined)
                prefilling.append(seq)
                continue
            if budget == 0:
                break  # nothing else fits: the prefills would not run either
            if inflight and not self._runs_ahead_ok(seq):
                continue
            blocks = seq.block_ids
            room = len(blocks) * size - computed  # free slots in its last block
            if room > 0:
                tokens[seq.seq_id] = 1
                budget -= 1
            elif room == 0 and allocator.num_free:  # its token starts a block (every `size` steps)
                block = allocator.allocate_one(seq.seq_id)
                blocks.append(block)
                new_blocks[seq.seq_id] = [block]
                tokens[seq.seq_id] = 1
                budget -= 1
            else:  # no block free (preempts), or blocks short
                draft.budget = budget
                self._schedule_running(seq, draft)
                budget = draft.budget
                if seq.seq_id not in tokens:
                    continue
            decoders.append(seq)
            contexts.append(computed)
        draft.budget = budget
        self._schedule_all(prefilling, draft)
        if not draft.preempted:
            self._admit_waiting(draft)

    def _compose_prefill_first(self, draft: StepDraft) -> None:
        """Prefill chunks only while any can run; a decode batch otherwise."""
        decoding = [s for s in self.running if s.is_decoding]
        self._schedule_all([s for s in self.running if not s.is_decoding], draft)
        if not draft.preempted:
            self._admit_waiting(draft)
        if not draft.tokens:
            self._schedule_all(decoding, draft)

    def _schedule_all(self, seqs: list[Sequence], draft: StepDraft) -> None:
        for seq in seqs:
            if draft.budget == 0:
                break
            if seq.status is SeqStatus.RUNNING:
                self._schedule_running(seq, draft)

    def _batch_shape(self, draft: StepDraft) -> tuple[BatchShape, list[Sequence]]:
        """The batch as policies see it (`step_draft.batch_shape`), and its decode items' sequences.
        A TPOT-aware policy also reads how long the steps in flight still run."""
        slack = self._wants_slack
        now = self.slo_clock() if slack else None
        batch, decoders = batch_shape(draft, self.seqs, self._wants_remaining, now)
        if now is not None and self.inflight:
            left = sum(f.decision.predicted_ms for f in self.inflight) - (now - self.inflight[0].sent_at) * 1e3
            batch.ahead_ms = left if left > 0 else 0.0
        return batch, decoders

    def _reserve_lookahead(self, draft: StepDraft, decoders: list[Sequence], decision: ModeDecision) -> ModeDecision:
        """Give every decode item blocks for `k` tokens; lower `k` until the free blocks suffice.

        `k` never takes a decoder past the model's context: its look-ahead passes compute positions
        `num_computed_tokens .. + k - 1`, and `max_model_len` is at most the model's positions (a
        position past those has no RoPE row, and the data plane fails the sequence)."""
        size = self.allocator.block_size
        k = max(1, min([decision.decode_steps, *(self.max_model_len - s.num_computed_tokens for s in decoders)]))
        if any(s.grammar is not None for s in decoders):
            k = 1  # a token mask covers one token: a structured output's next needs this one back first
        while k > 1:
            need = [max(-(-(s.num_computed_tokens + k) // size) - len(s.block_ids), 0) for s in decoders]
            if sum(need) <= self.allocator.num_free:
                break
            k -= 1
        if k > 1:
            for seq, n in zip(decoders, need):
                if n:
                    blocks = self.allocator.allocate(seq.seq_id, n)
                    seq.block_ids.extend(blocks)
                    draft.new_blocks.setdefault(seq.seq_id, []).extend(blocks)
        if k == decision.decode_steps:
            return decision
        return replace(decision, decode_steps=k)  # the prediction stays (a bound for fewer steps)

    def _runs_ahead_ok(self, seq: Sequence) -> bool:
        """Whether a sequence with tokens in flight may be scheduled before they arrive."""
        if _penalised(seq.sampling):
            return False  # penalties count every previous token on the host
        return seq.num_outputs < seq.stop.max_tokens and seq.num_tokens < self.max_model_len

    def _schedule_running(self, seq: Sequence, draft: StepDraft) -> None:
        num_tokens = min(seq.num_uncomputed_tokens, draft.budget)
        if num_tokens <= 0 or (seq.num_inflight and not self._runs_ahead_ok(seq)):
            return
        need = self.allocator.blocks_for_tokens(seq.num_computed_tokens + num_tokens) - len(seq.block_ids)
        if need > 0:  # most decodes fit their last block
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim, draft)
                if victim is seq:
                    return
            blocks = self.allocator.allocate(seq.seq_id, need)
            seq.block_ids.extend(blocks)
            draft.new_blocks[seq.seq_id] = blocks
        draft.tokens[seq.seq_id] = num_tokens
        draft.budget -= num_tokens

    def _preempt(self, victim: Sequence, draft: StepDraft) -> None:
        draft.preempted = True
        draft.budget += draft.tokens.pop(victim.seq_id, 0)
        draft.new_blocks.pop(victim.seq_id, None)
        self.running.remove(victim)
        self._release(victim)
        victim.num_inflight = 0  # results still to come for it are stale: the steps in flight drop them
        for step in self.inflight:
            step.stale.add(victim.seq_id)
        victim.status = SeqStatus.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def _admit_waiting(self, draft: StepDraft) -> None:
        cache = self.cache
        while self.waiting and draft.budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if cache is not None:
                if not self._admit_cached(seq, draft, cache):
                    break
                continue
            num_tokens = min(seq.num_tokens, draft.budget)
            need = self.allocator.blocks_for_tokens(num_tokens)
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.block_ids = self.allocator.allocate(seq.seq_id, need)
            self._start_running(seq)
            draft.tokens[seq.seq_id] = num_tokens
            draft.budget -= num_tokens

    def _start_running(self, seq: Sequence) -> None:
        seq.status = SeqStatus.RUNNING
        if self._by_priority:
            insort(self.running, seq, key=priority_key)
        else:
            self.running.append(seq)

    def _admit_cached(self, seq: Sequence, draft: StepDraft, cache: PrefixCachingAllocator) -> bool:
        """Admit the queue's head with the cached blocks its tokens start with, if the blocks for its
        first chunk are free (acquiring an idle cached block takes it from the free count)."""
        cached, parent = prefix_sharing.admission_match(cache, seq)
        hit = len(cached) * cache.block_size
        num_tokens = min(seq._num_prompt + len(seq.output_token_ids) - hit, draft.budget)
        need = cache.blocks_for_tokens(hit + num_tokens) - len(cached)
        if need + cache.num_idle(cached) > cache.num_free:
            return False
        self.waiting.popleft()
        cache.acquire(seq.seq_id, cached)
        cached.extend(cache.allocate(seq.seq_id, need))
        seq.block_ids = cached
        prefix_sharing.note_admission(seq, hit // cache.block_size, parent, cache.block_size)
        self._start_running(seq)
        draft.tokens[seq.seq_id] = num_tokens
        draft.budget -= num_tokens
        return True

    def _build_plan(self, draft: StepDraft, decision: ModeDecision, forecast: StepForecast | None) -> StepPlan:
        """The plan of `draft` under `decision`, recorded as the newest step in flight."""
        new_requests: list[NewRequest] = []
        scheduled: list[ScheduledSeq] = []
        expects, chunked, masks_due = self._plan_entries(draft, decision.decode_steps, new_requests, scheduled)
        plan = StepPlan(
            step_id=self._next_step_id,
            mode=decision.mode,
            prefill_sms=decision.prefill_sms,
            decode_sms=decision.decode_sms,
            decode_steps=decision.decode_steps,
            new_requests=new_requests,
            scheduled=scheduled,
            finished_seq_ids=self._dropped_on_worker,
            masks_follow=masks_due is not None,
        )
        self._next_step_id += 1
        self._dropped_on_worker = []
        now = time.monotonic()
        self.inflight.append(InflightStep(plan, expects, self.slo_clock(), forecast, decision,
                                          sum(expects.values()), sum(draft.tokens.values()), chunked=chunked,
                                          masks_due=masks_due))
        if self._result_at is not None:
            self.stats.host_gap_s += now - self._result_at
            self.stats.host_gaps += 1
        return plan

    def _plan_entries(self, draft: StepDraft, k: int, new_requests: list[NewRequest],
                      scheduled: list[ScheduledSeq]
                      ) -> tuple[dict[int, int], list[tuple[Sequence, int]], list[Sequence] | None]:
        """Append each drafted sequence's entry (and the new requests) and advance its computed and
        in-flight counts. Returns the tokens the step samples per sequence, with prefix caching the
        non-decode sequences with their computed end (`InflightStep.expects_token`, `.chunked`), and
        the structured outputs whose masks follow the plan (None: the entries carry theirs)."""
        seqs, new_blocks = self.seqs, draft.new_blocks
        noted = draft.noted_decoders()
        chunked: list[tuple[Sequence, int]] = []  # what the result confirms (InflightStep.chunked)
        masked: list[tuple[int, Sequence]] = []  # entries (their index) of structured outputs that sample
        caching = self.cache is not None
        # the tokens the step samples per scheduled sequence (0: none), from a copy of `tokens` (cheap:
        # the dict's table is cloned), whose first entries -- the noted decode items, each one token
        # that samples -- are right as they are unless the step looks ahead (k of them)
        expects = draft.tokens.copy()
        if k != 1:
            expects.update(dict.fromkeys(islice(draft.tokens, len(noted)), k))
        for seq in noted:
            if seq.grammar is not None:
                masked.append((len(scheduled), seq))
                scheduled.append(plan_entry(seq, 1, new_blocks, new_requests))
            elif seq.on_worker and seq.seq_id not in new_blocks:
                scheduled.append(seq._one_token_entry)
            else:
                scheduled.append(plan_entry(seq, 1, new_blocks, new_requests))
            seq.num_inflight += k
            seq.num_computed_tokens += k  # its token, and all but the last of the look-ahead passes'
        for seq_id, num_tokens in islice(draft.tokens.items(), len(noted), None):
            seq = seqs[seq_id]
            entry = plan_entry(seq, num_tokens, new_blocks, new_requests)
            computed = seq.num_computed_tokens + num_tokens
            samples = computed == seq._num_prompt + len(seq.output_token_ids) + seq.num_inflight
            if samples and seq.grammar is not None:
                masked.append((len(scheduled), seq))
            scheduled.append(entry)
            if samples:
                # it samples (the step computes every known token): k tokens for a decode item
                n = k if num_tokens == 1 else 1
                expects[seq_id] = n
                seq.num_inflight += n
                computed += n - 1  # look-ahead passes compute all but the last
            else:
                expects[seq_id] = 0
            seq.num_computed_tokens = computed
            if caching:
                chunked.append((seq, computed))
        if not masked:
            return expects, chunked, None
        if any(seq.num_inflight > 1 for _, seq in masked):  # a token still in flight: masks follow
            return expects, chunked, [seq for _, seq in masked]
        add_token_masks(scheduled, masked)
        return expects, chunked, None

    def check_invariants(self) -> None:
        live = {s.seq_id: s.block_ids for s in self.seqs.values()}
        self.allocator.check_invariants(live)
        for seq in self.running:
            assert seq.status is SeqStatus.RUNNING
            need = self.allocator.blocks_for_tokens(seq.num_computed_tokens)
            assert len(seq.block_ids) >= need, f"seq {seq.seq_id} has too few blocks"
        for seq in self.waiting:
            assert seq.status is SeqStatus.WAITING and not seq.block_ids
        if self._by_priority:  # a preemption takes the last: it must be the lowest-priority
            keys = [priority_key(s) for s in self.running]
            assert keys == sorted(keys), "running is out of priority order"


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
