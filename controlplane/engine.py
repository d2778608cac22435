"""The control plane's step loop: schedule, send the plan, apply the result, stream the outputs.

It owns the Scheduler and one OutputProcessor per live request, and talks to the data plane only
through DataplaneClient. It knows nothing of gRPC: the API layer turns its deltas into messages.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from controlplane.dataplane_client import DataplaneClient, DataplaneUnavailable
from controlplane.kv_blocks import BlockAllocator
from controlplane.observer import EngineObserver, RequestObs
from controlplane.output import OutputProcessor, RequestDelta
from controlplane.scheduler import Scheduler, SeqUpdate
from controlplane.sequence import FinishReason, Sequence, StopParams
from controlplane.tokenizer import TextTokenizer
from shared.config import SchedulerConfig
from shared.messages import SamplingParams, WorkerReady

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests (data plane gone or shutting down)."""


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: StopParams
    obs: RequestObs | None = None  # the servicer's span and timestamps; None: metrics only


class RequestHandle:
    """A live request's output stream; iterate it for RequestDeltas, the last one has finish_reason."""

    def __init__(self, request_id: str, seq_id: int, processor: OutputProcessor, obs: RequestObs) -> None:
        self.request_id = request_id
        self.seq_id = seq_id
        self.processor = processor
        self.obs = obs
        self.queue: asyncio.Queue[RequestDelta] = asyncio.Queue()
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestDelta]:
        while True:
            delta = await self.queue.get()
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
    ) -> None:
        self.client = client
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

    # ------------------------------------------------------------------ lifecycle

    async def start(self, handshake_timeout_s: float) -> WorkerReady:
        self.client.connect()
        ready = await self.client.handshake(handshake_timeout_s)
        budget = self.scheduler_config.max_num_batched_tokens
        if ready.max_num_batched_tokens and budget > ready.max_num_batched_tokens:
            raise EngineUnavailable(
                f"max_num_batched_tokens {budget} exceeds what the data plane's memory plan fits "
                f"({ready.max_num_batched_tokens}); start both with the same value"
            )
        self.worker = ready
        self.tokenizer = self._tokenizer_factory(ready)
        capacity_tokens = ready.num_kv_blocks * ready.block_size
        limits = [ready.max_model_len, capacity_tokens]
        if self._max_model_len_cap is not None:
            limits.append(self._max_model_len_cap)
        self.max_model_len = min(limits)
        allocator = BlockAllocator(ready.num_kv_blocks, ready.block_size)
        eos = frozenset(ready.model.eos_token_ids)
        self.scheduler = Scheduler(self.scheduler_config, allocator, self.max_model_len, eos, ready)
        self._task = asyncio.create_task(self._run(), name="engine-step-loop")
        return ready

    async def stop(self) -> None:
        """Abort every live request, stop the loop and tell the worker to exit."""
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
        if self.failure is None:
            try:
                await self.client.shutdown()
            except DataplaneUnavailable:
                pass
        self.client.close()

    @property
    def healthy(self) -> bool:
        return self.scheduler is not None and self.failure is None

    # ------------------------------------------------------------------ requests

    def add_request(self, request: EngineRequest) -> RequestHandle:
        if not self.healthy or self.scheduler is None or self.tokenizer is None:
            raise EngineUnavailable(self.failure or "engine not started")
        if request.request_id in self._handles:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            sampling=request.sampling,
            stop=request.stop,
            arrival_time=time.monotonic(),
        )
        processor = OutputProcessor(self.tokenizer.stream(), request.stop.stop_strings)
        obs = request.obs or RequestObs(arrival=seq.arrival_time)
        handle = RequestHandle(request.request_id, seq.seq_id, processor, obs)
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
        usage = (seq.num_prompt_tokens, len(seq.output_token_ids)) if seq else (0, 0)
        self.observer.request_finished(handle.obs, "abort", *usage)
        handle.queue.put_nowait(
            RequestDelta([], handle.processor.take_text(final=True), None, "abort", None, None, *usage)
        )
        self._wakeup.set()
        return True

    @property
    def num_live_requests(self) -> int:
        return len(self._handles)

    # ------------------------------------------------------------------ the step loop

    async def _run(self) -> None:
        assert self.scheduler is not None
        try:
            while True:
                started_ns = time.time_ns()
                plan = self.scheduler.schedule()
                if plan is None:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                plan = self.observer.step_planned(plan, self.scheduler, started_ns)
                result = await self.client.run_step(plan, self.step_timeout_s)
                self.num_steps += 1
                self._emit(self.scheduler.update(result))
                self.observer.step_done(plan, result, self.scheduler)
                await asyncio.sleep(0)  # let API tasks add and abort requests between steps
        except DataplaneUnavailable as exc:
            log.error("data plane unavailable: %s", exc)
            self._fail_all(f"data plane unavailable: {exc}")
        except Exception as exc:  # a bug: fail requests loudly instead of hanging them
            log.exception("engine step loop crashed")
            self._fail_all(f"engine failure: {exc!r}")

    def _fail_all(self, reason: str) -> None:
        self.failure = reason
        for request_id, handle in list(self._handles.items()):
            self.observer.request_finished(handle.obs, "error", 0, 0, reason)
            handle.queue.put_nowait(RequestDelta([], "", None, "error", None, reason))
            del self._handles[request_id]

    def _emit(self, updates: list[SeqUpdate]) -> None:
        assert self.scheduler is not None
        for update in updates:
            seq = update.seq
            handle = self._handles.get(seq.request_id)
            if handle is None or handle.seq_id != seq.seq_id:
                continue
            self.observer.tokens(handle.obs, len(update.new_token_ids))
            stop = handle.processor.add_tokens(update.new_token_ids)
            if stop is not None and not seq.is_finished:
                self.scheduler.finish(seq.seq_id, FinishReason.STOP, stop)
            elif stop is not None and seq.finish_reason is FinishReason.LENGTH:
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
            finished = seq.is_finished
            delta = RequestDelta(
                token_ids=update.new_token_ids,
                text=handle.processor.take_text(final=finished),
                logprobs=update.new_logprobs,
            )
            if finished:
                delta.finish_reason = seq.finish_reason.value if seq.finish_reason else "stop"
                delta.stop_reason = seq.stop_reason
                delta.error = seq.error
                delta.prompt_tokens = seq.num_prompt_tokens
                delta.completion_tokens = len(seq.output_token_ids)
                self.observer.request_finished(handle.obs, delta.finish_reason, delta.prompt_tokens,
                                               delta.completion_tokens, seq.error)
                del self._handles[seq.request_id]
                handle.finished = True
            handle.queue.put_nowait(delta)
