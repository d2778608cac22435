"""The control plane's step loop: schedule, send the plan, apply the result, stream the outputs.

It owns the Scheduler and one OutputProcessor per live request, and talks to the data plane only
through DataplaneClient. It knows nothing of gRPC: the API layer turns its deltas into messages.

When the data plane is lost (connection dropped, step timeout, fatal message) every live request
ends at once with a retryable error, the engine reports itself not serving, and it reconnects and
handshakes again (a supervisor, if any, restarts the process) with a fresh scheduler sized by the new
WorkerReady. Requests queued at the time fail too: while the data plane is down the engine holds no
requests. It does not start or kill processes (see `supervisor`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec

from controlplane.admission import QueueLimits
from controlplane.dataplane_client import DataplaneClient, DataplaneUnavailable
from controlplane.observer import EngineObserver, RequestObs
from controlplane.output import DeltaCollector, OutputProcessor, RequestDelta, cut_at_stop
from controlplane.prefix_cache import make_allocator
from controlplane.scheduler import Scheduler
from controlplane.sequence import FinishReason, Sequence, StopParams
from controlplane.step_records import SeqUpdate
from controlplane.structured_output import CompiledGrammar
from controlplane.tokenizer import NO_TEXT, TextTokenizer
from shared.config import SchedulerConfig
from shared.messages import SamplingParams, StepPlan, WorkerReady

log = logging.getLogger(__name__)


RECONNECT_BACKOFF_S = (0.1, 5.0)  # first and longest pause between reconnection attempts
RECONNECT_ATTEMPT_S = 15.0  # one handshake attempt while reconnecting (retried until the worker is back)


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests (data plane gone or shutting down)."""


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: StopParams
    obs: RequestObs | None = None  # the servicer's span and timestamps; None: metrics only
    priority: int = 0  # lower is admitted first under scheduling_policy="priority"
    skip_special_tokens: bool = True  # leave special tokens out of the streamed text
    detokenize: bool = True  # False: stream token ids only (no text, so no stop strings)
    grammar: CompiledGrammar | None = None  # structured outputs: the grammar every token must follow


class RequestHandle:
    """A live request's output stream; iterate it for RequestDeltas, the last one has finish_reason."""

    def __init__(self, request_id: str, seq_id: int, processor: OutputProcessor, obs: RequestObs,
                 stream_interval: int = 1) -> None:
        self.request_id = request_id
        self.seq_id = seq_id
        self.sent_prompt_logprobs = False  # the first message with tokens carries them
        self.processor = processor
        self.obs = obs
        self.queue = DeltaCollector(stream_interval)  # what piles up while the stream sends merges into one
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestDelta]:
        async for delta in self.until(None):
            yield delta

    async def until(self, deadline: float | None) -> AsyncIterator[RequestDelta]:
        """The deltas; raises TimeoutError once the event loop's clock passes `deadline`."""
        loop = asyncio.get_running_loop()
        while True:
            if deadline is None:
                delta = await self.queue.get()
            else:
                delta = await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0.0))
            yield delta
            if delta.finish_reason is not None:
                return


class Engine:
    def __init__(
        self,
        client: DataplaneClient,
        tokenizer_factory: Callable[[WorkerReady], TextTokenizer],
        scheduler_config: SchedulerConfig,
        *,
        step_timeout_s: float = 120.0,
        max_model_len: int | None = None,
        observer: EngineObserver | None = None,
        queue_limits: QueueLimits | None = None,
        slo_clock: Callable[[], float] | None = None,
        stream_interval: int = 1,
    ) -> None:
        self.client = client
        self.stream_interval = stream_interval  # tokens a stream's message waits for (the first goes at once)
        # the clock the scheduler's SLO bookkeeping runs on (default time.monotonic); every scheduler
        # this engine builds (each data-plane handshake) gets it
        self._slo_clock = slo_clock
        self.observer = observer or EngineObserver.disabled()
        self._tokenizer_factory = tokenizer_factory
        self.tokenizer: TextTokenizer | None = None
        self.scheduler_config = scheduler_config
        self.step_timeout_s = step_timeout_s
        self._max_model_len_cap = max_model_len
        self.worker: WorkerReady | None = None
        self.scheduler: Scheduler | None = None
        self.max_model_len = 0
        self._handles: dict[str, RequestHandle] = {}
        self._seq_ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failure: str | None = None
        self.num_steps = 0
        self.queue_limits = queue_limits
        self.draining = False
        self.num_reconnects = 0
        self._handshake_timeout_s = 300.0
        self._reconnecting = False
        self._limits_warned: tuple[int, int, int] | None = None  # the limits last warned about
        self._drain_cut = False  # set once, never cleared: a cut that comes before the drain starts counts
        # Hooks for the server and the supervisor; each is called on the event loop, must not block.
        self.on_serving: Callable[[bool], None] = lambda serving: None
        self.on_lost: Callable[[str], None] = lambda reason: None
        self.on_ready: Callable[[WorkerReady], None] = lambda ready: None
        # the pid of the data plane this control plane started (None: it started none). Only that one may
        # answer, and only it is told to exit at stop(): an attached one (--attach) is someone else's
        self.dataplane_pid: Callable[[], int | None] = lambda: None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, handshake_timeout_s: float) -> WorkerReady:
        self._handshake_timeout_s = handshake_timeout_s
        self.client.connect()
        ready = await self.client.handshake(handshake_timeout_s)
        self._install(ready)
        self._task = asyncio.create_task(self._run(), name="engine-step-loop")
        return ready

    def _install(self, ready: WorkerReady) -> None:
        """Size the scheduler and KV blocks from a WorkerReady (at start and after every reconnect)."""
        ours = self.dataplane_pid()
        if ours is not None and ready.pid and ready.pid != ours:
            raise EngineUnavailable(f"another data plane (pid {ready.pid}) serves {self.client.endpoint}, not the one "
                                    f"this serve started (pid {ours}): use another --dataplane-endpoint, or --attach "
                                    f"to that one")
        if self.worker is not None and ready.model != self.worker.model:
            # the tokenizer, chat template and limits were made for the first one
            was, now = msgspec.structs.asdict(self.worker.model), msgspec.structs.asdict(ready.model)
            differ = ", ".join(f"{k} {was[k]!r} -> {now[k]!r}" for k in was if was[k] != now[k])
            raise EngineUnavailable(f"the data plane came back with another model ({differ}); restart the "
                                    f"control plane to serve it")
        budget, seqs = self.scheduler_config.max_num_batched_tokens, self.scheduler_config.max_num_seqs
        if ready.max_num_batched_tokens and budget > ready.max_num_batched_tokens:
            raise EngineUnavailable(
                f"max_num_batched_tokens {budget} exceeds what the data plane's memory plan fits "
                f"({ready.max_num_batched_tokens}); start both with the same value"
            )
        if ready.max_num_seqs and seqs > ready.max_num_seqs:
            raise EngineUnavailable(
                f"max_num_seqs {seqs} exceeds what the data plane's memory plan and decode graphs are sized for "
                f"({ready.max_num_seqs}); start both with the same value"
            )
        self.worker = ready
        if self.tokenizer is None:
            self.tokenizer = self._tokenizer_factory(ready)
        capacity_tokens = ready.num_kv_blocks * ready.block_size
        limits = [ready.max_model_len, capacity_tokens]
        if self._max_model_len_cap is not None:
            limits.append(self._max_model_len_cap)
        self.max_model_len = min(limits)
        limits_seen = (self.max_model_len, ready.max_model_len, capacity_tokens)
        if limits_seen != self._limits_warned:  # once, not again on every reconnect to the same data plane
            self._limits_warned = limits_seen
            if self.queue_limits is not None and self.queue_limits.max_tokens < self.max_model_len:
                log.warning("max_queued_tokens %d is below max_model_len %d: longer prompts are refused",
                            self.queue_limits.max_tokens, self.max_model_len)
            if self._max_model_len_cap is not None and self.max_model_len < self._max_model_len_cap:
                log.warning("max_model_len %d asked for; serving %d (the model's positions: %d, the KV cache: "
                            "%d tokens)", self._max_model_len_cap, self.max_model_len, ready.max_model_len,
                            capacity_tokens)
        allocator = make_allocator(ready.num_kv_blocks, ready.block_size, self.scheduler_config.enable_prefix_caching)
        eos = frozenset(ready.model.eos_token_ids)
        self.scheduler = Scheduler(self.scheduler_config, allocator, self.max_model_len, eos, ready)
        if self._slo_clock is not None:
            self.scheduler.slo_clock = self._slo_clock
        self.failure = None
        self.on_ready(ready)
        self.on_serving(True)

    async def drain(self, grace_s: float) -> None:
        """Stop admitting; let live requests finish for up to `grace_s`, then end the rest (UNAVAILABLE)."""
        self.draining = True
        self.on_serving(False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(grace_s, 0.0)
        if self._handles and not self._drain_cut:
            log.info("shutting down: waiting up to %g s for %d running requests (a second signal ends them now)",
                     grace_s, len(self._handles))
        while self._handles and loop.time() < deadline and self.failure is None and not self._drain_cut:
            await asyncio.sleep(min(0.02, max(deadline - loop.time(), 0.0)))
        why = ("the server was stopped before the request finished" if self._drain_cut
               else f"the request did not finish within the {grace_s:g} s grace period")
        if self._handles:
            log.warning("shutting down: ending %d requests (%s)", len(self._handles), why)
        self._fail_all(f"server shutting down: {why}", keep_failure=True)

    def cut_drain(self) -> None:
        """End a drain now (an operator's second Ctrl-C): the requests still running end UNAVAILABLE."""
        self._drain_cut = True

    async def stop(self) -> None:
        """Abort every live request, stop the loop and tell the worker to exit (one we started and
        shook hands with: never an attached one, nor one that refused us)."""
        self.draining = True
        if self.scheduler is not None:
            predictor = self.scheduler.predictor
            log.info("steps run: %s; predictor error: %s", self.scheduler.stats.summary(),
                     predictor.report().as_dict() if predictor is not None else "no hardware profile")
        for request_id in list(self._handles):
            self.abort(request_id)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        linger_ms = 0
        if self.failure is None and self.dataplane_pid() is not None and self.worker is not None:
            try:
                await self.client.shutdown()
                linger_ms = 500  # let the Shutdown frame leave before the socket closes
            except DataplaneUnavailable:
                pass
        self.client.close(linger_ms)

    def dataplane_lost(self, reason: str) -> None:
        """Told from outside (the supervisor saw the process exit): fail over now if we were serving."""
        if not self._reconnecting:
            self.client.mark_lost(reason)

    @property
    def healthy(self) -> bool:
        return self.scheduler is not None and self.failure is None and not self.draining

    # ------------------------------------------------------------------ requests

    def add_request(self, request: EngineRequest, admitted: bool = False) -> RequestHandle:
        """Queue `request`; `admitted`: its queue room was already checked (`check_room`), as for the
        later completions of an n > 1 request, so a queue that filled meanwhile does not refuse it."""
        if not self.healthy or self.scheduler is None or self.tokenizer is None:
            raise EngineUnavailable(self.failure or ("server shutting down" if self.draining else "engine not started"))
        if request.request_id in self._handles:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        if self.queue_limits is not None and not admitted:
            self.queue_limits.check(self.scheduler.waiting, len(request.prompt_token_ids))
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            sampling=request.sampling,
            stop=request.stop,
            arrival_time=time.monotonic(),
            priority=request.priority,
            grammar=request.grammar.new_matcher() if request.grammar is not None else None,
        )
        stream = (self.tokenizer.stream(request.skip_special_tokens, request.prompt_token_ids) if request.detokenize
                  else NO_TEXT)
        processor = OutputProcessor(stream, request.stop.stop_strings, request.stop.include_stop_str_in_output,
                                    request.stop.min_tokens)
        obs = request.obs or RequestObs(arrival=seq.arrival_time)
        handle = RequestHandle(request.request_id, seq.seq_id, processor, obs, self.stream_interval)
        self._handles[request.request_id] = handle
        self.observer.request_added(handle.obs, request.request_id, seq.seq_id)
        self.scheduler.add(seq)
        self._wakeup.set()
        return handle

    def abort(self, request_id: str) -> bool:
        """End a live request now; its stream gets a final 'abort'. False if no such request."""
        handle = self._handles.pop(request_id, None)
        if handle is None or self.scheduler is None:
            return False
        seq = self.scheduler.finish(handle.seq_id, FinishReason.ABORT)
        handle.finished = True
        usage = _usage(seq)
        self.observer.request_finished(handle.obs, "abort", *usage)
        handle.queue.put_nowait(
            RequestDelta([], handle.processor.take_text(final=True), None, "abort", None, None, *usage)
        )
        self._wakeup.set()
        return True

    def has_request(self, request_id: str) -> bool:
        return request_id in self._handles

    def check_room(self, num_prompt_tokens: int, count: int) -> None:
        """Raise Overloaded unless the queue has room for `count` requests of this prompt (BeyondLimits if
        they exceed a limit on their own)."""
        if self.queue_limits is not None and self.scheduler is not None:
            self.queue_limits.check(self.scheduler.waiting, num_prompt_tokens, count)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (between steps: the event loop runs one thing at a time); the
        blocks dropped. ValueError when prefix caching is off, EngineUnavailable before the data plane."""
        if self.scheduler is None:
            raise EngineUnavailable("engine not ready")
        dropped = self.scheduler.reset_prefix_cache()
        log.info("prefix cache reset: %d blocks dropped", dropped)
        return dropped

    @property
    def num_live_requests(self) -> int:
        return len(self._handles)

    # ------------------------------------------------------------------ the step loop

    async def _run(self) -> None:
        while True:
            try:
                await self._step_loop()
            except DataplaneUnavailable as exc:
                log.error("data plane unavailable: %s", exc)
                self._lose(f"data plane unavailable: {exc}")
            except Exception as exc:  # a bug: fail requests loudly instead of hanging them, then start over
                log.exception("engine step loop crashed")
                self._lose(f"engine failure: {exc!r}")
            await self._reconnect()

    async def _step_loop(self) -> None:
        """Keep up to `scheduler.max_inflight` plans at the data plane; apply results in order.

        With two in flight, step i+1 is planned and sent while step i runs, so the control plane's
        and the data plane's host work overlap the GPU's. Between steps the API's tasks run (requests
        added and aborted, streams written): when a result left no step in flight (steps one at a time:
        no async scheduling, or a structured output waiting for its token without deferred masks or
        with penalties), only after the next steps
        (up to `max_inflight`) are planned and sent, so that they run while the GPU computes rather than
        while it waits. An abort that becomes runnable just then may be in one more step (its KV blocks
        are freed when it runs). A step planned with `masks_follow` gets its token masks as soon as the
        result before it is applied, ahead of the API's tasks and of the next plan."""
        inflight: deque[StepPlan] = deque()
        yield_after_plan = False
        try:
            while True:
                scheduler = self.scheduler
                assert scheduler is not None
                if len(inflight) < scheduler.max_inflight:
                    started_ns = time.time_ns()
                    plan = scheduler.schedule()
                    if plan is not None:
                        plan = self.observer.step_planned(plan, scheduler, started_ns)
                        await self.client.send_plan(plan)
                        inflight.append(plan)
                        continue
                if yield_after_plan:
                    yield_after_plan = False
                    await asyncio.sleep(0)  # let API tasks add and abort requests, write the streams
                    continue
                if not inflight:
                    self.observer.idle(scheduler)
                    self._wakeup.clear()
                    await self.client.wait(self._wakeup)
                    continue
                result = await self.client.receive_result(
                    inflight[0].step_id, self.step_timeout_s,
                    lambda progress: self._emit(scheduler.progress(progress)))  # tokens before the step ends
                plan = inflight.popleft()
                self.num_steps += 1
                updates = scheduler.update(result)
                masks = scheduler.token_masks_due()
                if masks is not None:  # the next step's sampling waits for them: before the streams are written
                    await self.client.send_masks(masks)
                self._emit(updates)
                self.observer.step_done(plan, result, scheduler)
                if inflight:
                    await asyncio.sleep(0)  # let API tasks add and abort requests between steps
                else:  # the GPU is idle: plan the next step first
                    yield_after_plan = True
        finally:
            if inflight and self.scheduler is not None:
                self.scheduler.inflight.clear()  # their results will never be applied

    def _lose(self, reason: str) -> None:
        """The data plane is gone: end every live request now, report not serving, tell the supervisor."""
        self.failure = reason
        self.observer.step_lost(reason)
        self._fail_all(reason)
        self.on_serving(False)
        self.on_lost(reason)

    async def _reconnect(self) -> None:
        """Handshake with a (restarted) data plane on a fresh socket until one answers."""
        delay, longest = RECONNECT_BACKOFF_S
        self._reconnecting = True
        try:
            while True:
                self.client.reset()
                try:
                    # short attempts: a Hello answered into a connection being torn down is re-sent soon
                    ready = await self.client.handshake(min(self._handshake_timeout_s, RECONNECT_ATTEMPT_S))
                    self._install(ready)
                except (DataplaneUnavailable, EngineUnavailable) as exc:
                    log.warning("data plane not back yet (%s); retrying in %.1f s", exc, delay)
                    self.client.disconnect()  # a data plane we refused is not held meanwhile (one owner at a time)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, longest)
                    continue
                self.num_reconnects += 1
                log.info("data plane back: %d KV blocks, serving again", ready.num_kv_blocks)
                return
        finally:
            self._reconnecting = False

    def _fail_all(self, reason: str, keep_failure: bool = False) -> None:
        """End every live request with a retryable error and free its blocks."""
        if not keep_failure:
            self.failure = reason
        for request_id, handle in list(self._handles.items()):
            seq = self.scheduler.finish(handle.seq_id, FinishReason.ERROR) if self.scheduler else None
            usage = _usage(seq)
            self.observer.request_finished(handle.obs, "error", *usage, reason)
            handle.queue.put_nowait(RequestDelta([], "", None, "error", None, reason, *usage, retryable=True))
            handle.finished = True
            del self._handles[request_id]
        self._wakeup.set()

    def _emit(self, updates: list[SeqUpdate]) -> None:
        assert self.scheduler is not None
        for update in updates:
            seq = update.seq
            handle = self._handles.get(seq.request_id)
            if handle is None or handle.seq_id != seq.seq_id:
                continue
            self.observer.tokens(handle.obs, len(update.new_token_ids), seq.num_prompt_tokens)
            new_ids, new_logprobs = update.new_token_ids, update.new_logprobs
            # a sequence that finished on STOP before its text was read here ended on its last token (EOS or
            # a stop token id) or on a complete structured output; a stop string is found only below
            token_stop = bool(new_ids) and seq.stopped_on_token
            stop = handle.processor.add_tokens(new_ids, token_stop)
            cut = False
            if stop is not None:  # tokens after the one that completed the stop string are dropped
                new_ids, new_logprobs = cut_at_stop(seq, new_ids, new_logprobs, handle.processor.stop_kept)
                cut = len(new_ids) < len(update.new_token_ids)
            if stop is not None and not seq.is_finished:
                self.scheduler.finish(seq.seq_id, FinishReason.STOP, stop)
            elif stop is not None and (cut or seq.finish_reason is FinishReason.LENGTH):
                # the string came first: the token that finished the sequence (EOS, a stop token) is cut
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
            finished = seq.is_finished
            delta = RequestDelta(
                token_ids=new_ids,
                text=handle.processor.take_text(final=finished),
                logprobs=new_logprobs,
            )
            if seq.prompt_logprobs is not None and not handle.sent_prompt_logprobs and update.new_token_ids:
                delta.prompt_logprobs, delta.prompt_token_ids = seq.prompt_logprobs, seq.prompt_token_ids
                handle.sent_prompt_logprobs = True
            if finished:
                delta.finish_reason = seq.finish_reason.value if seq.finish_reason else "stop"
                delta.stop_reason = seq.stop_reason
                delta.error = seq.error
                delta.prompt_tokens = seq.num_prompt_tokens
                delta.completion_tokens = len(seq.output_token_ids)
                delta.cached_tokens = seq.num_cached_tokens
                self.observer.request_finished(handle.obs, delta.finish_reason, delta.prompt_tokens,
                                               delta.completion_tokens, delta.cached_tokens, seq.error)
                del self._handles[seq.request_id]
                handle.finished = True
            handle.queue.put_nowait(delta)


def _usage(seq: Sequence | None) -> tuple[int, int, int]:
    """A finished request's prompt tokens, completion tokens and prompt tokens found in the prefix cache."""
    return (seq.num_prompt_tokens, len(seq.output_token_ids), seq.num_cached_tokens) if seq else (0, 0, 0)
