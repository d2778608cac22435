"""Watches the engine and turns what happens into spans and metrics; it never changes a decision.

Span tree (one trace per request; the request span honours an incoming W3C traceparent):

    text_completion <model>              (SERVER, from the gRPC servicer; `chat <model>` for chat prompts)
    ├── queue                            (added -> first scheduled)
    ├── prefill_chunk  (one per chunk)   link -> scheduler.step
    │   └── dataplane.seq                (data plane, via `seq.<id>` in the plan's trace context)
    └── decode                           (first decode step -> finish) link -> first decode step
        └── dataplane.seq                (the first decode step only, to bound the span count)

and per step, its own trace: scheduler.step -> dataplane.execute (via `traceparent` in the plan).
With no tracer provider nothing is injected into plans and no span is made; with no metric reader
the metrics are no-ops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from controlplane import tracing as tr
from controlplane.metrics import REFUSAL_CODES, ServingMetrics
from controlplane.sequence import Sequence
from shared.messages import StepPlan, StepResult
from shared.telemetry import inject, seq_key, traceparent


log = logging.getLogger(__name__)
# the attributes a fan-out completion takes from the request span (not its outcome: finish, usage, latency)
_REQUEST_ATTRIBUTE_PREFIXES = ("gen_ai.request.", "gen_ai.response.id", "gen_ai.operation.", "gen_ai.system",
                               "gen_ai.provider.")


class SchedulerView(Protocol):
    """What the observer reads from the scheduler (duck-typed; `last_predicted_ms` is optional)."""

    seqs: dict[int, Sequence]
    num_preemptions: int

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...


@dataclass(eq=False)
class RequestObs:
    """One request's timestamps (monotonic seconds) and open spans."""

    arrival: float
    span: Span | None = None
    request_id: str = ""
    seq_id: int = -1
    queue_span: Span | None = None
    chunk_span: Span | None = None
    decode_span: Span | None = None
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    decode_start: float | None = None
    num_chunks: int = 0
    num_decode_steps: int = 0
    finish_reason: str | None = None
    error: str | None = None  # why the call failed, as the client saw it
    error_type: str | None = None  # its gRPC status code's name (the span's `error.type`)
    completion_tokens: int = 0  # its output tokens, once finished
    max_tokens: int | None = None  # its max_tokens, once the call was accepted
    is_call: bool = True  # a gRPC call's own record (False: completion i > 0 of an n > 1 call)
    # completions 1..n-1 of an n > 1 request (on completion 0's record): the call's span sums them up
    children: list[RequestObs] = field(default_factory=list)

    def set(self, attributes: dict[str, object]) -> None:
        if self.span is not None:
            self.span.set_attributes(attributes)

    def name_operation(self, operation: str, model: str) -> None:
        """Rename the request span for what the prompt turned out to be (e.g. `chat <model>`)."""
        if self.span is not None:
            self.span.update_name(f"{operation} {model}")
            self.span.set_attribute("gen_ai.operation.name", operation)


@dataclass
class _Step:
    span: Span | None
    chunks: list[tuple[RequestObs, Span]]  # the prefill-chunk spans this step opened
    predicted_ms: float | None
    num_tokens: int = 0  # tokens the plan schedules (counted only with metrics on)


def _logged(stop: Callable[[], object]) -> Callable[[], None]:
    """`stop`, its exception logged: one exporter failing to stop does not keep the other from stopping
    (and a thread's exception would only be printed)."""
    def run() -> None:
        try:
            stop()
        except Exception:
            log.exception("telemetry: stopping an exporter failed")
    return run


def _end(span: Span | None, end_ns: int | None = None) -> None:
    if span is not None and span.is_recording():
        span.end(end_time=end_ns)


def _end_chunks(step: _Step) -> None:
    """End the chunk spans a step opened (a request's newer chunk may be in a later step)."""
    for obs, span in step.chunks:
        _end(span)
        if obs.chunk_span is span:
            obs.chunk_span = None


def _shown_id(engine_id: str) -> str:
    """A request's id as a log shows it: completion i of an n > 1 request (engine id `<id>\\x1f<i>`, see
    api.choice_id) as `<id>#<i>`, not with an invisible separator."""
    return engine_id.replace("\x1f", "#") if engine_id else "?"


def _log_request(obs: RequestObs, reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                 error: str | None, now: float) -> None:
    """The access-log line of a finished request: its id, how it ended, its tokens and latencies."""
    def ms(start: float | None, end: float | None) -> str:
        return "-" if start is None or end is None else f"{(end - start) * 1e3:.1f}"

    log.info("request %s finished %s: prompt %d tokens (%d cached), completion %d, queue %s ms, TTFT %s ms, "
             "e2e %s ms%s", _shown_id(obs.request_id), reason, prompt_tokens, cached_tokens, completion_tokens,
             ms(obs.arrival, obs.first_scheduled), ms(obs.arrival, obs.first_token), ms(obs.arrival, now),
             f", error: {error}" if error else "")


class EngineObserver:
    def __init__(self, provider: TracerProvider | None, metrics: ServingMetrics | None, model: str,
                 log_requests: bool = False) -> None:
        self.provider = provider
        self.log_requests = log_requests  # one INFO line per finished request (vLLM's --enable-log-requests)
        self.tracer = provider.get_tracer("duetserve.controlplane") if provider else None
        self._metrics_owned = metrics
        self.metrics = metrics if metrics is not None and metrics.enabled else None
        self.model = model
        self._by_seq: dict[int, RequestObs] = {}
        self._steps: dict[int, _Step] = {}  # step id -> its record, while in flight
        # the scheduler whose preemption count the metric has caught up with, and how far
        self._preempt_scheduler: object | None = None
        self._preempt_seen = 0

    @classmethod
    def disabled(cls) -> EngineObserver:
        return cls(None, None, "")

    # ------------------------------------------------------------------ request lifecycle

    def start_request(self, metadata: object = None) -> RequestObs:
        """Called first thing by the servicer; the request span starts here."""
        obs = RequestObs(arrival=time.monotonic())
        if self.tracer is not None:
            parent = tr.incoming_context(metadata)  # type: ignore[arg-type]
            obs.span = tr.start_request_span(self.tracer, self.model, parent, time.time_ns())
        return obs

    def start_completion(self, parent: RequestObs, index: int) -> RequestObs:
        """Completion `index` (> 0) of an n > 1 request: its span a child of the request's span (completion
        0's), in the same trace, with the request's attributes and `duetserve.choice_index`. Its clock
        starts at the call's arrival, as a vLLM child request's does."""
        obs = RequestObs(arrival=parent.arrival, max_tokens=parent.max_tokens, is_call=False)
        parent.children.append(obs)
        if self.tracer is not None and parent.span is not None and parent.span.is_recording():
            attributes = {key: value for key, value in (getattr(parent.span, "attributes", None) or {}).items()
                          if key.startswith(_REQUEST_ATTRIBUTE_PREFIXES)}  # not completion 0's outcome
            if isinstance(seed := attributes.get("gen_ai.request.seed"), int):
                attributes["gen_ai.request.seed"] = (seed + index) % 2**64  # completion i samples with seed + i
            attributes["duetserve.choice_index"] = index
            obs.span = self.tracer.start_span(getattr(parent.span, "name", tr.REQUEST_SPAN),
                                              context=trace.set_span_in_context(parent.span),
                                              kind=SpanKind.INTERNAL, attributes=attributes)
        return obs

    def request_accepted(self, obs: RequestObs, n: int, max_tokens: int) -> None:
        """The engine took the call (all n of it): its n is recorded (once per call, as vLLM's
        request_params_n), its max_tokens (the effective one: clamped to the room the prompt leaves) kept
        for each completion's end (request_params_max_tokens)."""
        obs.max_tokens = max_tokens
        if self.metrics:
            self.metrics.request_params_n.record(n, self.metrics.labels)

    def request_added(self, obs: RequestObs, request_id: str, seq_id: int) -> None:
        obs.request_id, obs.seq_id = request_id, seq_id
        self._by_seq[seq_id] = obs
        if obs.span is not None and self.tracer is not None and obs.span.is_recording():
            obs.span.set_attribute("duetserve.seq_id", seq_id)
            ctx = trace.set_span_in_context(obs.span)
            obs.queue_span = self.tracer.start_span(tr.QUEUE_SPAN, context=ctx)

    def tokens(self, obs: RequestObs, count: int, prompt_tokens: int) -> None:
        """`count` new tokens of a request reached the engine (before a stop string cuts any, as vLLM
        counts generated tokens). The token counters move here, as the tokens come, not when the request
        ends (a dashboard's rate would read 0 while long completions stream); the first token also
        counts the prompt as prefilled. (Its prefix-cache lookup is counted at admission, `_admitted`.)"""
        if count <= 0:
            return
        now = time.monotonic()
        metrics = self.metrics
        if obs.first_token is None:
            obs.first_token = now
            if metrics:
                labels = metrics.labels
                metrics.ttft.record(now - obs.arrival, labels)
                metrics.prompt_tokens.add(prompt_tokens, labels)
        elif metrics and obs.last_token is not None:
            metrics.itl.record(now - obs.last_token, metrics.labels)
        if metrics:
            metrics.generation_tokens.add(count, metrics.labels)
        obs.last_token = now

    def request_finished(self, obs: RequestObs, reason: str, prompt_tokens: int, completion_tokens: int,
                         cached_tokens: int = 0, error: str | None = None) -> None:
        """`cached_tokens`: prompt tokens its admission found in the prefix cache."""
        if obs.finish_reason is not None:
            return
        obs.finish_reason = reason
        obs.completion_tokens = completion_tokens
        self._by_seq.pop(obs.seq_id, None)
        now = time.monotonic()
        if self.log_requests:
            _log_request(obs, reason, prompt_tokens, completion_tokens, cached_tokens, error, now)
        if self.metrics:
            labels = self.metrics.labels
            self.metrics.e2e.record(now - obs.arrival, labels)
            self.metrics.request_success.add(1, {**labels, "finished_reason": reason})
            self._phase_times(obs, prompt_tokens, completion_tokens, now)
        if obs.span is None:
            return
        obs.set(tr.usage_attributes(reason, prompt_tokens, completion_tokens, cached_tokens))
        obs.set(self._latencies(obs, now))
        if error:
            obs.span.set_status(Status(StatusCode.ERROR, error))
        if obs.decode_span is not None and obs.decode_span.is_recording():
            obs.decode_span.set_attribute("duetserve.decode.steps", obs.num_decode_steps)
        for span in (obs.queue_span, obs.chunk_span, obs.decode_span):
            _end(span)

    def _phase_times(self, obs: RequestObs, prompt_tokens: int, completion_tokens: int, now: float) -> None:
        """A finished request's per-request histograms (vLLM's): its phases, TPOT, token counts."""
        m = self.metrics
        assert m is not None
        labels = m.labels
        m.request_prompt_tokens.record(prompt_tokens, labels)
        m.request_generation_tokens.record(completion_tokens, labels)
        if obs.max_tokens is not None:
            m.request_params_max_tokens.record(obs.max_tokens, labels)
        if obs.first_scheduled is None:  # never scheduled: no phase ran
            return
        m.inference_time.record(now - obs.first_scheduled, labels)
        if obs.first_token is None:
            return
        m.prefill_time.record(obs.first_token - obs.first_scheduled, labels)
        m.decode_time.record(now - obs.first_token, labels)
        if completion_tokens > 1:
            m.tpot.record((now - obs.first_token) / (completion_tokens - 1), labels)

    @staticmethod
    def _latencies(obs: RequestObs, now: float) -> dict[str, object]:
        """vLLM's gen_ai.latency.* attributes, in seconds."""
        out: dict[str, object] = {"gen_ai.latency.e2e": now - obs.arrival,
                                  "duetserve.prefill_chunks": obs.num_chunks,
                                  "duetserve.decode_steps": obs.num_decode_steps}
        if obs.first_scheduled is not None:
            out["gen_ai.latency.time_in_queue"] = obs.first_scheduled - obs.arrival
        if obs.first_token is not None:
            out["gen_ai.latency.time_to_first_token"] = obs.first_token - obs.arrival
            if obs.first_scheduled is not None:
                out["gen_ai.latency.time_in_model_prefill"] = obs.first_token - obs.first_scheduled
            out["gen_ai.latency.time_in_model_decode"] = now - obs.first_token
        return out

    def close_request(self, obs: RequestObs) -> None:
        """Called last by the servicer (also on rejection or cancellation): counts a refused call and ends
        the request span."""
        if self.metrics and obs.is_call and obs.finish_reason is None and obs.error_type in REFUSAL_CODES:
            self.metrics.request_refused.add(1, {**self.metrics.labels, "code": obs.error_type})
        if obs.span is None or not obs.span.is_recording():
            return
        error = obs.error
        if obs.finish_reason is None:  # never reached the engine's end: rejected, cancelled, or failed
            # the status code the call ended with; none: the client went away
            tr.end_call_status(obs.span, obs.error_type or "CANCELLED",
                               error or "the call ended before the request finished", obs.is_call)
            for span in (obs.queue_span, obs.chunk_span, obs.decode_span):
                _end(span)
        elif error:
            tr.end_call_status(obs.span, obs.error_type or "_OTHER", error, obs.is_call)
        elif obs.is_call:
            tr.end_call_status(obs.span, "OK", None, rpc=True)
        if obs.children:  # the call's span is the whole response's: every choice's reason and tokens
            done = [obs, *obs.children]
            tokens = sum(o.completion_tokens for o in done)
            obs.set({"gen_ai.response.finish_reasons": [o.finish_reason or "none" for o in done],
                     "gen_ai.usage.output_tokens": tokens, "gen_ai.usage.completion_tokens": tokens})
        obs.span.end()

    # ------------------------------------------------------------------ steps

    def step_planned(self, plan: StepPlan, scheduler: SchedulerView, started_ns: int) -> StepPlan:
        """Record the step's decision; with tracing on, return the plan carrying trace context."""
        self._gauges(scheduler, plan)
        self._count_preemptions(scheduler)  # those schedule() made to fit this plan
        predicted = getattr(scheduler, "last_predicted_ms", None)
        step = self._steps[plan.step_id] = _Step(None, [], predicted)
        if self.metrics is not None or self.tracer is not None or self.log_requests:
            step.num_tokens = self._admitted(plan, started_ns, scheduler)
        if self.tracer is None:
            return plan
        attrs = tr.step_plan_attributes(plan, scheduler.num_running, scheduler.num_waiting, predicted)
        step_span = self.tracer.start_span(tr.STEP_SPAN, context=trace.set_span_in_context(trace.INVALID_SPAN),
                                           start_time=started_ns, attributes=attrs)
        step.span = step_span
        context = inject(trace.set_span_in_context(step_span))
        # an unsampled step is never exported: no request's span links to it, and when no request of
        # the step is sampled either the plan carries no context (the data plane makes no spans for it)
        sampled = step_span.get_span_context().trace_flags.sampled
        link = [Link(step_span.get_span_context())] if sampled else []
        traced = False
        for entry in plan.scheduled:
            obs = self._by_seq.get(entry.seq_id)
            seq = scheduler.seqs.get(entry.seq_id)
            if obs is None or seq is None or obs.span is None or not obs.span.is_recording():
                continue
            phase_span = self._phase_span(obs, seq, entry.num_tokens, link, started_ns, step, plan.decode_steps)
            if phase_span is not None:
                context[seq_key(entry.seq_id)] = traceparent(phase_span.get_span_context())
                traced = True
        if not (sampled or traced):
            return plan
        return msgspec.structs.replace(plan, trace_context=context)

    def _admitted(self, plan: StepPlan, started_ns: int, scheduler: SchedulerView) -> int:
        """End the queue phase of requests scheduled for the first time, and count their prompts'
        prefix-cache lookup (as vLLM, when the cache was looked up); returns the plan's tokens."""
        now = time.monotonic()
        num_tokens = 0
        for entry in plan.scheduled:
            num_tokens += entry.num_tokens
            obs = self._by_seq.get(entry.seq_id)
            if obs is None or obs.first_scheduled is not None:
                continue
            obs.first_scheduled = now
            _end(obs.queue_span, started_ns)
            if self.metrics is not None:
                labels = self.metrics.labels
                self.metrics.queue_time.record(now - obs.arrival, labels)
                seq = scheduler.seqs.get(entry.seq_id)
                if seq is not None:
                    self.metrics.prefix_cache_queries.add(seq.num_prompt_tokens, labels)
                    self.metrics.prefix_cache_hits.add(seq.num_cached_tokens, labels)
        return num_tokens

    def _phase_span(self, obs: RequestObs, seq: Sequence, num_tokens: int, link: list[Link],
                    started_ns: int, step: _Step, k: int) -> Span | None:
        """Open this step's span for one request; returns it when the data plane should join it."""
        assert self.tracer is not None and obs.span is not None
        parent = trace.set_span_in_context(obs.span)
        if num_tokens == 1 and seq.num_outputs > k:  # a decode step (it had outputs before this step's k)
            obs.num_decode_steps += 1
            if obs.decode_span is not None:
                return None
            obs.decode_span = self.tracer.start_span(tr.DECODE_SPAN, context=parent, links=link,
                                                     start_time=started_ns)
            return obs.decode_span
        obs.chunk_span = self.tracer.start_span(
            tr.PREFILL_SPAN, context=parent, links=link, start_time=started_ns,
            attributes={"duetserve.chunk.index": obs.num_chunks, "duetserve.chunk.num_tokens": num_tokens,
                        "duetserve.chunk.computed_before": seq.num_computed_tokens - num_tokens},
        )
        obs.num_chunks += 1
        step.chunks.append((obs, obs.chunk_span))
        return obs.chunk_span

    def step_done(self, plan: StepPlan, result: StepResult, scheduler: SchedulerView) -> None:
        step = self._steps.pop(plan.step_id, None)
        self._gauges(scheduler, plan)
        if step is None:
            return
        self._count_preemptions(scheduler)
        if self.metrics:
            if step.predicted_ms is not None and result.timings.total_ms > 0:
                err = abs(step.predicted_ms - result.timings.total_ms) / result.timings.total_ms * 100.0
                self.metrics.set_predictor_error(err)
            self._step_metrics(plan, result, step.num_tokens)
        _end_chunks(step)
        if step.span is not None:
            step.span.set_attributes(tr.step_result_attributes(result, step.predicted_ms))
            if result.failures:
                step.span.set_status(Status(StatusCode.ERROR, f"{len(result.failures)} sequences failed: "
                                                              f"{result.failures[0].message}"))
            step.span.end()

    def _count_preemptions(self, scheduler: SchedulerView) -> None:
        """Add the preemptions the scheduler made since last counted (a new scheduler counts from 0)."""
        if self.metrics is None:
            return
        if scheduler is not self._preempt_scheduler:
            self._preempt_scheduler, self._preempt_seen = scheduler, 0
        total = scheduler.num_preemptions
        if total > self._preempt_seen:
            self.metrics.preemptions.add(total - self._preempt_seen, self.metrics.labels)
            self._preempt_seen = total

    def idle(self, scheduler: SchedulerView) -> None:
        """No step in flight and none to plan: the gauges say so (requests aborted while queued)."""
        self._gauges(scheduler, None)
        self._count_preemptions(scheduler)

    def _step_metrics(self, plan: StepPlan, result: StepResult, num_tokens: int) -> None:
        m = self.metrics
        assert m is not None
        labels = {**m.labels, "mode": plan.mode}
        m.steps.add(1, labels)
        m.step_tokens.add(num_tokens, labels)
        t = result.timings
        m.step_time.add(t.total_ms, {**labels, "phase": "total"})
        if plan.mode == "multiplexed":
            m.step_time.add(t.prefill_ms, {**labels, "phase": "prefill"})
            m.step_time.add(t.decode_ms, {**labels, "phase": "decode"})

    def step_lost(self, reason: str) -> None:
        """The steps in flight will never get a result (the data plane was lost): end their spans."""
        steps, self._steps = self._steps, {}
        for step in steps.values():
            _end_chunks(step)
            if step.span is not None:
                step.span.set_status(Status(StatusCode.ERROR, reason))
                step.span.end()
        if self.metrics is not None:  # every request ends with the data plane: nothing runs, waits or holds KV
            m, labels = self.metrics, self.metrics.labels
            for gauge in (m.running, m.waiting, m.kv_usage, m.sm_prefill, m.sm_decode):
                gauge.set(0, labels)

    def _gauges(self, scheduler: SchedulerView, plan: StepPlan | None) -> None:
        """Running, waiting and KV use now; the SM split of `plan` (None: keep the last step's)."""
        if self.metrics is None:
            return
        m, labels = self.metrics, self.metrics.labels
        m.running.set(scheduler.num_running, labels)
        m.waiting.set(scheduler.num_waiting, labels)
        allocator = getattr(scheduler, "allocator", None)
        if allocator is not None and allocator.num_blocks:
            m.kv_usage.set(1.0 - allocator.num_free / allocator.num_blocks, labels)
        if plan is not None:
            m.sm_prefill.set(plan.prefill_sms, labels)
            m.sm_decode.set(plan.decode_sms, labels)

    def shutdown(self) -> None:
        """Flush batched spans and stop the exporters (called once at server stop)."""
        steps, self._steps = self._steps, {}
        for step in steps.values():  # the engine stopped with these steps in flight
            _end_chunks(step)  # a request's older chunk, in an earlier step, is no longer on its record
            if step.span is not None:
                step.span.set_status(Status(StatusCode.ERROR, "no result: the engine stopped or lost the data plane"))
                step.span.end()
        # spans and metrics flush side by side: each waits at most SHUTDOWN_EXPORT_TIMEOUT_S for its exporter
        stops = [_logged(owner.shutdown) for owner in (self.provider, self._metrics_owned) if owner is not None]
        self.provider = self._metrics_owned = None
        threads = [threading.Thread(target=stop, name="telemetry-stop") for stop in stops]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
