"""How the scheduler applies what the data plane answers: the tokens of a `StepProgress` or
`StepResult`, its failures and missing tokens, the prefix-cache confirmation of the step's chunks
(`prefix_sharing.confirm`) and the measured times the predictor learns from.

`StepOutcomes` is a mixin of `Scheduler` (it reads and writes the scheduler's sequences and steps in
flight; the attributes it uses are declared below). It must not plan steps or allocate blocks: a
result only ever frees them, through `Scheduler.finish`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from controlplane import prefix_sharing
from controlplane.predictor import Predictor
from controlplane.prefix_cache import PrefixCachingAllocator
from controlplane.sequence import FinishReason, Sequence, check_token_stop
from controlplane.step_records import InflightStep, SeqUpdate
from controlplane.step_stats import StepStats
from shared.messages import SeqOutput, StepProgress, StepResult, StepTimings, TokenLogprobs

log = logging.getLogger(__name__)


class StepOutcomes:
    """Applies step answers to the oldest step in flight (the `Scheduler` provides the state)."""

    seqs: dict[int, Sequence]
    inflight: deque[InflightStep]
    stats: StepStats
    cache: PrefixCachingAllocator | None
    predictor: Predictor | None
    eos_token_ids: frozenset[int]
    max_model_len: int
    slo_clock: Callable[[], float]
    _result_at: float | None

    def finish(self, seq_id: int, reason: FinishReason, stop_reason: str | None = None) -> Sequence | None:
        raise NotImplementedError  # the Scheduler's

    def progress(self, message: StepProgress) -> list[SeqUpdate]:
        """Apply tokens of the oldest step in flight that reached the host before the step ended."""
        if not self.inflight or message.step_id != self.inflight[0].plan.step_id:
            raise RuntimeError(f"progress for step {message.step_id} does not match the oldest step in flight")
        updates: list[SeqUpdate] = []
        self._accept(self.inflight[0], message.outputs, updates)
        return updates

    def _accept(self, inflight: InflightStep, outputs: list[SeqOutput], updates: list[SeqUpdate]) -> None:
        """Count each output's tokens as arrived and append them to `updates`, unless the step no
        longer speaks for the sequence (preempted since, or finished: a token computed past a stop
        is dropped; `seqs` holds live sequences only). The common token (a running sequence with
        tokens already that nothing can stop) is applied inline: this loop sees every sequence of
        every step. Its update shares the output's token list (the result is not read again)."""
        seqs, expects, stale = self.seqs, inflight.expects_token, inflight.stale
        arrived = 0
        for output in outputs:
            seq_id = output.seq_id
            expected = expects.get(seq_id, 0)
            if output.prompt_logprobs is not None:
                self._take_prompt_logprobs(output, inflight)
            if expected <= 0:
                continue
            seq = seqs.get(seq_id)
            if seq is None or seq_id in stale:
                continue
            token_ids = output.token_ids
            k = len(token_ids)
            n = k if k <= expected else expected
            expects[seq_id] = expected - n
            arrived += n
            seq.num_inflight -= n
            out = seq.output_token_ids
            # no length stop within these tokens (prompt + outputs < its token cap), no stop token, no grammar
            if out and output.logprobs is None and seq._num_prompt + len(out) + k < seq._token_cap \
                    and seq.grammar is None:
                if k == 1:  # a decode's one token (most outputs): no set or list method to call
                    token = token_ids[0]
                    if token not in seq._stop_token_ids:
                        out.append(token)
                        updates.append(SeqUpdate(seq, token_ids, None, False))
                        continue
                elif seq._stop_token_ids.isdisjoint(token_ids):
                    out.extend(token_ids)
                    updates.append(SeqUpdate(seq, token_ids, None, False))
                    continue
            updates.append(self._append_tokens(seq, token_ids, output.logprobs))
        inflight.outstanding -= arrived

    def _take_prompt_logprobs(self, output: SeqOutput, inflight: InflightStep) -> None:
        """Append the prompt logprobs of a chunk, skipping positions already held (a preempted
        sequence recomputes its prompt, and its chunks send them again)."""
        seq = self.seqs.get(output.seq_id)
        if seq is None or seq.prompt_logprobs is None or output.seq_id in inflight.stale:
            return
        entries = output.prompt_logprobs or []
        skip = len(seq.prompt_logprobs) + 1 - output.prompt_logprobs_start
        if 0 <= skip < len(entries):
            seq.prompt_logprobs.extend(entries[skip:])
        elif skip < 0:  # chunks arrive in order: a gap is a data-plane bug, not the client's to guess at
            log.warning("seq %d: prompt logprobs from position %d, but only %d are held; dropped",
                        output.seq_id, output.prompt_logprobs_start, len(seq.prompt_logprobs))

    def update(self, result: StepResult) -> list[SeqUpdate]:
        """Apply the worker's answer to the oldest step in flight; returns per-sequence changes."""
        if not self.inflight or result.step_id != self.inflight[0].plan.step_id:
            raise RuntimeError(f"result for step {result.step_id} does not match the step in flight")
        inflight = self.inflight.popleft()
        self._result_at = time.monotonic()
        self.stats.record(inflight.plan, result.timings, inflight.num_tokens)
        if inflight.forecast is not None:
            self._observe(inflight, result.timings)
        updates: list[SeqUpdate] = []
        for failure in result.failures:
            seq = self.seqs.get(failure.seq_id)
            if seq is not None and failure.seq_id not in inflight.stale:
                owed = max(inflight.expects_token.pop(failure.seq_id, 0), 0)
                seq.num_inflight -= owed
                inflight.outstanding -= owed
                seq.on_worker = False  # the worker dropped it already
                seq.error = failure.message
                self.finish(seq.seq_id, FinishReason.ERROR)
                updates.append(SeqUpdate(seq, [], None, True))
        self._accept(inflight, result.outputs, updates)
        if inflight.outstanding <= 0:  # every token the step owed has arrived
            self._confirm(inflight)
            return updates
        answered = {o.seq_id for o in result.outputs} | {f.seq_id for f in result.failures}
        for seq_id, left in inflight.expects_token.items():
            seq = self.seqs.get(seq_id)
            if left <= 0 or seq is None or seq_id in inflight.stale:
                continue
            seq.num_inflight -= left  # tokens the step owed and never sent
            if not seq.is_finished:  # its computed count ran ahead by them: it could never be scheduled again
                got = f"{left} tokens fewer than its look-ahead owed" if seq_id in answered else "no token"
                seq.error = f"the data plane returned {got} for seq {seq_id} in step {result.step_id}"
                self.finish(seq_id, FinishReason.ERROR)
                updates.append(SeqUpdate(seq, [], None, True))
        self._confirm(inflight)
        return updates

    def _confirm(self, inflight: InflightStep) -> None:
        """With prefix caching: the step's chunks are computed (their sequences still live, the step
        still speaking for them, none failed -- a failure or a missing token finished it): register
        their full blocks."""
        seqs, stale, cache = self.seqs, inflight.stale, self.cache
        for seq, computed in inflight.chunked:
            if seqs.get(seq.seq_id) is seq and seq.seq_id not in stale:
                assert cache is not None
                prefix_sharing.confirm(cache, seq, computed)

    def _observe(self, inflight: InflightStep, timings: StepTimings) -> None:
        """Feed the measured times to the predictor (a phase measured as 0 ms was not measured)."""
        assert inflight.forecast is not None and self.predictor is not None
        measured = {"total": timings.total_ms, "prefill": timings.prefill_ms,
                    "decode": timings.decode_ms / max(inflight.decision.decode_steps, 1)}
        for regime, raw_ms, which in inflight.forecast.observations(inflight.decision):
            self.predictor.observe(regime, raw_ms, measured[which])

    def _append_tokens(
        self, seq: Sequence, token_ids: list[int], logprobs: list[TokenLogprobs] | None
    ) -> SeqUpdate:
        """Append tokens one by one, stopping at the first that ends the sequence (`_accept` takes
        the tokens that cannot stop it without coming here). A structured output's grammar is fed each
        token: one it refuses fails the sequence (the data plane ignored its mask), and one that
        completes it ends the sequence as a stop (the grammar allows nothing more)."""
        out, eos, max_len = seq.output_token_ids, self.eos_token_ids, self.max_model_len
        if not out and token_ids:
            seq.first_token_at = self.slo_clock()
        accepted = len(token_ids)
        grammar = seq.grammar
        for i, token_id in enumerate(token_ids):
            refused = grammar.accept(token_id) if grammar is not None else None
            if refused is not None:  # not appended: the client never sees it
                seq.error = f"structured output: token {token_id} breaks the request's grammar ({refused})"
                self.finish(seq.seq_id, FinishReason.ERROR)
                accepted = i
                break
            out.append(token_id)
            if logprobs is not None and i < len(logprobs):
                seq.output_logprobs.append(logprobs[i])
            stop = check_token_stop(seq, token_id, eos, max_len)
            if grammar is not None and grammar.done and (stop is None or stop[0] is FinishReason.LENGTH):
                stop = FinishReason.STOP, None  # complete: a stop, even on its last allowed token
            if stop is not None:
                self.finish(seq.seq_id, stop[0], stop[1])
                accepted = i + 1
                break
        new_logprobs = logprobs[:accepted] if logprobs is not None else None
        return SeqUpdate(seq, token_ids[:accepted], new_logprobs, seq.is_finished)
