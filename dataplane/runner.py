"""Executes StepPlans: per-sequence state, plan -> tensors -> forward -> sample -> StepResult.

The runner keeps each sequence's tokens, computed count and block table (the physical side of the
control plane's logical bookkeeping). It checks every plan item and reports request-scoped
problems as SeqFailures; it never decides what to schedule.

On CUDA a step never blocks the host: inputs go up in one async copy, sampled tokens come back by
an async copy into pinned memory, and `PendingStep.ready()` polls a CUDA event. A plan sent with
`masks_follow` runs its forward pass at launch and keeps the logits; `apply_masks` samples them when
the step's TokenMasks comes (the sampling queued behind the forward on the same stream).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dataplane.attention.base import AttentionBackend, AttentionBatch
from dataplane.graphs import DecodeGraphs
from dataplane.multiplex import Multiplexer
from dataplane.piecewise import PiecewiseGraphs
from dataplane.models.config import ModelConfig
from dataplane.models.dense import DenseForCausalLM
from dataplane.sampler import LogprobTensors, Sampler, has_penalties, prompt_logprobs, to_device
from dataplane.seq_state import (
    SeqError, SeqState, check_scheduled, check_token_mask, fail_by_plan, new_state,
)
from dataplane.staging import Span, positions_and_slots
from shared.messages import (
    ScheduledSeq, SeqFailure, SeqOutput, StepPlan, StepResult, StepTimings, TokenLogprobs, TokenMasks,
)


POLL_INTERVAL_S = 50e-6


@dataclass
class _Item:
    state: SeqState
    num_tokens: int


@dataclass
class _PassOutput:
    """One forward pass's sampled rows, with their tokens still on the device or in flight."""

    states: list[SeqState]
    tokens: torch.Tensor  # host copy (in flight until the step's event fires)
    logprobs: LogprobTensors | None
    device_tokens: torch.Tensor | None = None  # feeds the next look-ahead pass
    copied: torch.cuda.Event | None = None  # fires when this pass's host copies have landed (CUDA)
    # (sequence, prompt position of the first entry, logprobs) of chunks that asked for prompt logprobs
    prompt: list[tuple[SeqState, int, LogprobTensors]] = field(default_factory=list)
    logits: torch.Tensor | None = None  # a pass whose sampling waits for its token masks: its rows' logits


@dataclass
class PendingStep:
    """A launched step: poll `ready()`, then `result()` (which never waits on the device)."""

    step_id: int
    started: float
    failures: list[SeqFailure]
    passes: list[_PassOutput] = field(default_factory=list)
    done: torch.cuda.Event | None = None
    start_event: torch.cuda.Event | None = None
    phases: dict = field(default_factory=dict)  # "prefill"/"decode" -> PhaseEvents (multiplexed steps)
    awaiting_masks: bool = False  # planned with `masks_follow`: sampling waits for `ModelRunner.apply_masks`
    planned: frozenset[int] = frozenset()  # with `masks_follow`: the sequences the plan schedules
    # with masks that followed (CUDA): the forward's end and the sampling's start, so the step's time
    # leaves out the GPU's wait for the masks
    forward_done: torch.cuda.Event | None = None
    resumed: torch.cuda.Event | None = None
    _reported: int = 0  # leading passes already handed out by progress()

    def ready(self) -> bool:
        return not self.awaiting_masks and (self.done is None or self.done.query())

    def wait(self, poll_s: float = POLL_INTERVAL_S) -> StepResult:
        """Poll the step's CUDA event (never a blocking device sync), then collect the result."""
        while not self.ready():
            time.sleep(poll_s)
        return self.result()

    def progress(self) -> list[SeqOutput]:
        """Tokens of the leading passes whose copies have landed while the step still runs (look-ahead
        decode passes, a multiplexed step's decode phase); each pass is reported once. The last pass
        is left to `result()`, which follows it at once (a one-pass step sends no progress)."""
        if self.done is None:
            return []
        ready = self._reported
        while ready < len(self.passes) - 1:
            p = self.passes[ready]
            if not (p.copied.query() if p.copied is not None else not (p.states or p.prompt)):  # nothing to copy: done
                break
            ready += 1
        return self._outputs(ready)

    def _outputs(self, upto: int) -> list[SeqOutput]:
        """Materialise passes `_reported`..`upto` (their tokens join their sequences) as outputs."""
        outputs: dict[int, tuple[list[int], list[TokenLogprobs] | None]] = {}
        prompt: dict[int, tuple[int, list[TokenLogprobs]]] = {}
        for p in self.passes[self._reported : upto]:
            for state, start, tensors in p.prompt:
                entries = tensors.materialise(len(tensors.rows))
                prompt.setdefault(state.seq_id, (start, []))[1].extend(entries)  # type: ignore[arg-type]
                outputs.setdefault(state.seq_id, ([], None))
            tokens = p.tokens.tolist()
            lps = p.logprobs.materialise(len(tokens)) if p.logprobs is not None else [None] * len(tokens)
            for state, token, lp in zip(p.states, tokens, lps):
                state.token_ids.append(token)
                state.num_inflight -= 1
                toks, lp_list = outputs.setdefault(state.seq_id, ([], [] if lp is not None else None))
                if lp_list is None and lp is not None:  # its entry was made for its prompt logprobs
                    lp_list = []
                    outputs[state.seq_id] = (toks, lp_list)
                toks.append(token)
                if lp_list is not None and lp is not None:
                    lp_list.append(lp)
        self._reported = max(self._reported, upto)
        return [SeqOutput(seq_id=s, token_ids=t, logprobs=lp, prompt_logprobs=prompt[s][1] if s in prompt else None,
                          prompt_logprobs_start=prompt[s][0] if s in prompt else 0)
                for s, (t, lp) in outputs.items()]

    def result(self) -> StepResult:
        """The step's end: every pass not reported by `progress()`, failures and timings."""
        outputs = self._outputs(len(self.passes))
        total_ms = (time.perf_counter() - self.started) * 1000.0
        source = "host"
        if self.done is not None and self.start_event is not None:
            total_ms, source = self.start_event.elapsed_time(self.done), "cuda_events"
            if self.forward_done is not None and self.resumed is not None:
                total_ms = self.start_event.elapsed_time(self.forward_done) + self.resumed.elapsed_time(self.done)
        phase_ms = {name: ev.elapsed_ms() for name, ev in self.phases.items()}
        return StepResult(
            step_id=self.step_id,
            outputs=outputs,
            failures=self.failures,
            timings=StepTimings(total_ms=total_ms, prefill_ms=phase_ms.get("prefill", 0.0),
                                decode_ms=phase_ms.get("decode", 0.0), source=source),  # type: ignore[arg-type]
        )


class ModelRunner:
    def __init__(
        self,
        model: DenseForCausalLM,
        config: ModelConfig,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        sampler: Sampler,
        *,
        block_size: int,
        num_blocks: int,
        device: torch.device,
        graphs: DecodeGraphs | None = None,
        multiplexer: Multiplexer | None = None,
        pieces: PiecewiseGraphs | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.kv_caches = kv_caches
        self.backend = backend
        self.sampler = sampler
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        self.graphs = graphs
        self.multiplexer = multiplexer
        self.pieces = pieces  # prefill and mixed passes on the whole GPU, by token bucket
        self.seqs: dict[int, SeqState] = {}
        # seq id -> (device tensor, row) of its newest sampled token: a plan sent before that token
        # reached the host (async scheduling) feeds it to the next decode from here
        self._last_sampled: dict[int, tuple[torch.Tensor, int]] = {}
        self._prompt_seqs: set[int] = set()  # sequences that asked for prompt logprobs (most steps: none)
        self._cuda = device.type == "cuda"

    # ------------------------------------------------------------------ plan handling

    def execute(self, plan: StepPlan, masks: TokenMasks | None = None) -> StepResult:
        """Launch and wait (tests, CPU), with `masks` when the plan's masks follow (none: every row
        unmasked). The worker uses launch() and polls instead."""
        pending = self.launch(plan)
        if pending.awaiting_masks:
            self.apply_masks(pending, masks or TokenMasks(step_id=plan.step_id))
        if pending.done is not None:
            pending.done.synchronize()
        return pending.result()

    def launch(self, plan: StepPlan) -> PendingStep:
        pending = PendingStep(step_id=plan.step_id, started=time.perf_counter(), failures=[],
                              awaiting_masks=plan.masks_follow)
        if plan.masks_follow:
            pending.planned = frozenset(e.seq_id for e in plan.scheduled)
        for seq_id in plan.finished_seq_ids:
            self.drop(seq_id)
        for new in plan.new_requests:
            try:
                self.drop(new.seq_id)
                self.seqs[new.seq_id] = new_state(new, self.config.vocab_size, self.num_blocks)
                if new.sampling.prompt_logprobs is not None:
                    self._prompt_seqs.add(new.seq_id)
            except SeqError as exc:
                pending.failures.append(SeqFailure(seq_id=new.seq_id, message=str(exc)))
        failed = fail_by_plan(plan, pending.failures, self.drop)
        items: list[_Item] = []
        for entry in plan.scheduled:
            if entry.seq_id in failed:
                continue
            try:
                state = check_scheduled(self.seqs, entry, plan.decode_steps, self.block_size, self.num_blocks,
                                        self.config.max_position_embeddings)
                if entry.token_mask:  # structured outputs only: most entries have none
                    check_token_mask(entry, state.num_computed + entry.num_tokens == state.num_known,
                                     plan.decode_steps > 1 and state.is_decode(entry.num_tokens),
                                     self.config.vocab_size)
                state.token_mask = entry.token_mask
                items.append(_Item(state, entry.num_tokens))
            except SeqError as exc:
                self.drop(entry.seq_id)
                pending.failures.append(SeqFailure(seq_id=entry.seq_id, message=str(exc)))
        if self._cuda:
            pending.start_event = torch.cuda.Event(enable_timing=True)
            pending.start_event.record()
        if plan.mode == "multiplexed" and self.multiplexer is not None and items:
            self.multiplexer.run(self, items, plan, pending)
        else:
            self._run(items, plan.decode_steps, pending, defer=plan.masks_follow)
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            if plan.masks_follow:
                pending.forward_done = event
            else:
                pending.done = event
        return pending

    @torch.inference_mode()
    def apply_masks(self, pending: PendingStep, masks: TokenMasks) -> None:
        """Sample the rows of a step launched with `masks_follow` under their token masks (a row not listed
        samples unmasked). A mask of the wrong size, or for a sequence the step computes but samples no
        token for, fails that sequence alone, as in a plan entry; one for a sequence not in the step is
        ignored. A sequence failed here gets no output (its prompt logprobs are dropped too)."""
        if not pending.awaiting_masks:
            raise ValueError(f"step {pending.step_id} awaits no token masks")
        by_seq = {m.seq_id: m.mask for m in masks.masks}
        failed_before = len(pending.failures)
        if self._cuda:
            pending.resumed = torch.cuda.Event(enable_timing=True)
            pending.resumed.record()
        deferred = pending.passes[0] if pending.passes and pending.passes[0].logits is not None else None
        if deferred is not None:
            rows: list[int] = []
            states: list[SeqState] = []
            for row, state in enumerate(deferred.states):
                mask = by_seq.pop(state.seq_id, b"")
                if not self._mask_ok(pending, state.seq_id, mask, samples=True):
                    continue
                state.token_mask = mask
                rows.append(row)
                states.append(state)
            logits = deferred.logits
            assert logits is not None
            if len(rows) < len(deferred.states):
                logits = logits.index_select(0, to_device(rows, torch.long, self.device))
            out = self._sample(logits, states) if states else _PassOutput([], torch.empty(0, dtype=torch.long), None)
            if deferred.prompt:
                out.prompt = deferred.prompt
                if self._cuda and out.copied is None:
                    out.copied = torch.cuda.Event()
                    out.copied.record()
            pending.passes[0] = out
        for seq_id, mask in by_seq.items():  # every sequence this step samples for took its mask above
            if seq_id in pending.planned and seq_id in self.seqs:
                self._mask_ok(pending, seq_id, mask, samples=False)
        failed = {f.seq_id for f in pending.failures[failed_before:]}
        for p in pending.passes if failed else ():
            p.prompt = [entry for entry in p.prompt if entry[0].seq_id not in failed]
        pending.awaiting_masks = False
        if self._cuda:
            pending.done = torch.cuda.Event(enable_timing=True)
            pending.done.record()

    def _mask_ok(self, pending: PendingStep, seq_id: int, mask: bytes, samples: bool) -> bool:
        """`check_token_mask` for a mask that followed its plan; a bad one fails (and drops) its sequence."""
        try:
            check_token_mask(ScheduledSeq(seq_id=seq_id, num_tokens=1, token_mask=mask), samples, False,
                             self.config.vocab_size)
        except SeqError as exc:
            self.drop(seq_id)
            pending.failures.append(SeqFailure(seq_id=seq_id, message=str(exc)))
            return False
        return True

    def drop(self, seq_id: int) -> None:
        """Forget a sequence (steps still running keep what they hold of it)."""
        self.seqs.pop(seq_id, None)
        self._last_sampled.pop(seq_id, None)
        self._prompt_seqs.discard(seq_id)

    def clear(self) -> None:
        self.seqs.clear()
        self._last_sampled.clear()
        self._prompt_seqs.clear()

    # ------------------------------------------------------------------ execution

    def _run(self, items: list[_Item], decode_steps: int, pending: PendingStep, stream_key: object = "full",
             eager: bool = False, defer: bool = False) -> None:
        """One pass over every item, then decode_steps-1 look-ahead passes over the decoders; `defer`: the
        pass keeps its logits for `apply_masks` (one pass only)."""
        if not items:
            return
        decoders = [it.state for it in items if it.state.is_decode(it.num_tokens)]
        first = self._forward_and_sample(items, stream_key, eager=eager, defer=defer)
        pending.passes.append(first)
        self.lookahead(decoders, first, decode_steps - 1, pending, stream_key)

    def lookahead(self, decoders: list[SeqState], first: _PassOutput, steps: int, pending: PendingStep,
                  stream_key: object) -> None:
        """`steps` more decode passes; each feeds on the previous pass's tokens on the device. With
        penalties, each pass also counts the tokens the step's earlier passes sampled (still on the
        device, not yet in the sequences' token lists)."""
        previous = first
        penalised = any(has_penalties(s.sampling) for s in decoders)
        sampled: torch.Tensor | None = None  # [decoders, passes so far] device ids, when penalised
        for step in range(1, steps + 1):
            if not decoders:
                return
            rows = {s.seq_id: i for i, s in enumerate(previous.states)}
            index = torch.tensor([rows[s.seq_id] for s in decoders], dtype=torch.long)
            input_ids = previous.device_tokens[index.to(self.device, non_blocking=True)]
            if penalised:
                sampled = input_ids[:, None] if sampled is None else torch.cat([sampled, input_ids[:, None]], 1)
            previous = self._forward_and_sample([_Item(s, 1) for s in decoders], stream_key, step, input_ids,
                                                inflight_ids=sampled)
            pending.passes.append(previous)

    def _stage(self, items: list[_Item], with_tokens: bool) -> tuple[torch.Tensor, ...]:
        """All per-step index arrays in one host tensor, moved with one async copy.

        A decode whose input token is still on the device (sampled by a step whose result is not
        collected) gets a placeholder here, filled on the device from that step's tokens."""
        flat: list[int] = []
        spans: list[Span] = []
        sample_rows: list[int] = []
        fills: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}  # id(tensor) -> (tensor, dst, src)
        row = 0
        for it in items:
            s = it.state
            start, end = s.num_computed, s.num_computed + it.num_tokens
            if with_tokens:
                known = s.token_ids[start:end]
                if len(known) < it.num_tokens:  # check_scheduled allows this for a decode only
                    tensor, src = self._last_sampled[s.seq_id]
                    group = fills.setdefault(id(tensor), (tensor, [], []))
                    group[1].append(row)
                    group[2].append(src)
                    known = [0]
                flat.extend(known)
            spans.append((start, end, s.block_table))
            row += it.num_tokens
            if end >= len(s.token_ids):  # look-ahead passes run past the host's known tokens
                sample_rows.append(row - 1)
        positions, slots = positions_and_slots(spans, self.block_size)
        t = len(positions)
        gather = [i for _, dst, src in fills.values() for i in (*dst, *src)]
        host = torch.from_numpy(np.concatenate([np.asarray(flat, dtype=np.int64), positions, slots,
                                                np.asarray(sample_rows + gather, dtype=np.int64)]))
        dev = host.to(self.device, non_blocking=True)
        f, r = len(flat), len(sample_rows)
        ids = dev[:f]
        offset = f + 2 * t + r
        for tensor, dst, src in fills.values():
            n = len(dst)
            ids.index_copy_(0, dev[offset : offset + n], tensor.index_select(0, dev[offset + n : offset + 2 * n]))
            offset += 2 * n
        return ids, dev[f : f + t], dev[f + t : f + 2 * t], dev[f + 2 * t : f + 2 * t + r]

    @torch.inference_mode()
    def _forward_and_sample(self, items: list[_Item], stream_key: object = "full", step: int = 0,
                            input_ids: torch.Tensor | None = None, eager: bool = False,
                            inflight_ids: torch.Tensor | None = None, defer: bool = False) -> _PassOutput:
        """One forward pass; `input_ids` (device) replaces the host tokens in look-ahead passes, and
        `inflight_ids` ([items, j], device) are the tokens the step's earlier passes sampled for them.

        `eager` keeps the pass off the decode graphs (a multiplexed step's prefill stream); `defer` keeps
        the sampling rows' logits in the output, unsampled (masks to follow)."""
        batch = AttentionBatch(
            query_lens=[it.num_tokens for it in items],
            context_lens=[it.state.num_computed for it in items],
            block_tables=[it.state.block_table for it in items],
            block_size=self.block_size,
        )
        staged_ids, positions, slots, sample_rows = self._stage(items, with_tokens=input_ids is None)
        input_ids = staged_ids if input_ids is None else input_ids
        graphs = None if eager else self.graphs
        bucket = graphs.bucket_for(batch.num_seqs) if graphs is not None and batch.is_decode_only else None
        if graphs is not None and bucket is not None and graphs.ensure(stream_key, None, bucket):
            hidden = graphs.run(batch, input_ids, positions, slots, stream_key)
        else:
            self.backend.begin_step(batch, self.device, slots)
            if (self.pieces is not None and stream_key == "full" and not eager
                    and 1 <= batch.num_tokens <= self.pieces.max_tokens):
                hidden = self.pieces.run(input_ids, positions, self.backend)
            else:
                hidden = self.model(input_ids, positions, self.backend, self.kv_caches)
        prompt = self._prompt_logprobs(items, hidden) if step == 0 and self._prompt_seqs else []
        samplers: list[SeqState] = []
        for it in items:
            it.state.num_computed += it.num_tokens
            if it.state.num_computed >= len(it.state.token_ids):
                samplers.append(it.state)
        if samplers and defer:
            out = _PassOutput(samplers, torch.empty(0, dtype=torch.long), None,
                              logits=self.model.compute_logits(hidden[sample_rows]))
        elif samplers:
            out = self._sample(self.model.compute_logits(hidden[sample_rows]), samplers, step,
                               inflight_ids if len(samplers) == len(items) else None)
        else:
            out = _PassOutput([], torch.empty(0, dtype=torch.long), None)
        if prompt:
            out.prompt = prompt
            if self._cuda and out.copied is None:
                out.copied = torch.cuda.Event()
                out.copied.record()  # after the prompt logprobs' host copies
        return out

    def _prompt_logprobs(self, items: list[_Item], hidden: torch.Tensor) -> list[tuple[SeqState, int, LogprobTensors]]:
        """For each chunk whose request asked: the logprobs of the prompt tokens its rows predict (row
        j predicts token j + 1, up to the prompt's last), started on their way to the host."""
        out: list[tuple[SeqState, int, LogprobTensors]] = []
        row = 0
        for it in items:
            s = it.state
            first = s.num_computed
            last = min(first + it.num_tokens, s.num_prompt_tokens - 1)  # tokens first+1..last are predicted
            if s.sampling.prompt_logprobs is not None and last > first:
                tensors = prompt_logprobs(self.model.compute_logits, hidden[row : row + last - first],
                                          s.token_ids[first + 1 : last + 1], s.sampling.prompt_logprobs)
                out.append((s, first + 1, tensors.to_host_async() if self._cuda else tensors))
            row += it.num_tokens
        return out

    def _sample(self, logits: torch.Tensor, states: list[SeqState], step: int = 0,
                inflight_ids: torch.Tensor | None = None) -> _PassOutput:
        """Sample on the device; `step` look-ahead passes count tokens the host has not seen yet
        (`inflight_ids`: theirs, one row per state, for the penalties)."""
        params = [s.sampling for s in states]
        penalised = any(has_penalties(p) for p in params)
        prompt_ids = output_ids = None
        if penalised:  # host tensors: the sampler moves them with non-blocking copies
            prompt_ids = [torch.tensor(s.token_ids[: s.num_prompt_tokens]) for s in states]
            output_ids = [torch.tensor(s.token_ids[s.num_prompt_tokens :], dtype=torch.long) for s in states]
        counts = [s.num_generated for s in states]  # counts this step's earlier passes (in flight)
        masks = [s.token_mask for s in states] if step == 0 and any(s.token_mask for s in states) else None
        out = self.sampler.sample(logits, params, counts, prompt_ids, output_ids, inflight_ids, masks)
        tokens = out.token_ids
        for row, state in enumerate(states):
            state.num_inflight += 1
            self._last_sampled[state.seq_id] = (tokens, row)
        logprobs = out.logprob_tensors
        copied = None
        if self._cuda:
            tokens = tokens.to("cpu", non_blocking=True)
            logprobs = logprobs.to_host_async() if logprobs is not None else None
            copied = torch.cuda.Event()
            copied.record()  # on this pass's stream: its host copies are done when this fires
        return _PassOutput(states, tokens, logprobs, device_tokens=out.token_ids, copied=copied)
