"""Data-plane spans: one `dataplane.execute` span per traced step, plus one `dataplane.seq` span per
sequence the control plane asked for (a `seq.<id>` key in the plan's trace context), so the data
plane's work shows up inside each request's own trace.

It follows the control plane's decision: a plan with an empty trace context is run untouched. It
must not change what is executed, and holds no policy.
"""

from __future__ import annotations

import logging
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

from shared.config import TelemetryConfig
from shared.messages import StepPlan, StepResult
from shared.telemetry import DATAPLANE_SERVICE, extract, extract_traceparent, make_tracer_provider, seq_contexts

log = logging.getLogger(__name__)


def _step_attributes(plan: StepPlan, result: StepResult) -> dict[str, object]:
    t = result.timings
    return {
        "duetserve.step.id": plan.step_id,
        "duetserve.step.mode": plan.mode,
        "duetserve.step.prefill_sms": plan.prefill_sms,
        "duetserve.step.decode_sms": plan.decode_sms,
        "duetserve.step.decode_steps": plan.decode_steps,
        "duetserve.step.num_new_requests": len(plan.new_requests),
        "duetserve.step.num_scheduled": len(plan.scheduled),
        "duetserve.step.num_tokens": sum(s.num_tokens for s in plan.scheduled),
        "duetserve.step.num_failures": len(result.failures),
        "duetserve.step.measured_ms": t.total_ms,
        "duetserve.step.prefill_ms": t.prefill_ms,
        "duetserve.step.decode_ms": t.decode_ms,
        "duetserve.step.timing_source": t.source,
    }


class DataplaneTracing:
    """Wraps the runner's execute call; a no-op without a provider or without context in the plan."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self._tracer: Tracer | None = provider.get_tracer("duetserve.dataplane") if provider else None

    @classmethod
    def from_config(cls, config: TelemetryConfig) -> DataplaneTracing:
        return cls(make_tracer_provider(config, DATAPLANE_SERVICE))

    def record(self, plan: StepPlan, result: StepResult, start_ns: int) -> None:
        """Spans of a step launched at `start_ns` whose result is in (steps run asynchronously)."""
        if self._tracer is None or not plan.trace_context:
            return
        span = self._tracer.start_span("dataplane.execute", context=extract(plan.trace_context),
                                       kind=SpanKind.INTERNAL, start_time=start_ns,
                                       attributes=_step_attributes(plan, result))
        if result.failures:
            span.set_status(Status(StatusCode.ERROR, f"{len(result.failures)} sequences failed: "
                                                     f"{result.failures[0].message}"))
        end = time.time_ns()
        span.end(end_time=end)
        self._seq_spans(plan, result, span, start_ns, end)

    def _seq_spans(self, plan: StepPlan, result: StepResult, step: Span, start: int, end: int) -> None:
        assert self._tracer is not None
        wanted = seq_contexts(plan.trace_context)
        if not wanted:
            return
        link = [Link(step.get_span_context())] if step.get_span_context().trace_flags.sampled else []  # exported
        tokens = {s.seq_id: s.num_tokens for s in plan.scheduled}
        new = {r.seq_id for r in plan.new_requests}
        sampled = {o.seq_id: len(o.token_ids) for o in result.outputs}
        failed = {f.seq_id: f.message for f in result.failures}
        for seq_id, parent in wanted.items():
            attributes: dict[str, object] = {
                "duetserve.seq_id": seq_id,
                "duetserve.step.id": plan.step_id,
                "duetserve.num_tokens": tokens.get(seq_id, 0),
                "duetserve.registered": seq_id in new,
                "duetserve.sampled_tokens": sampled.get(seq_id, 0),
                "duetserve.step.measured_ms": result.timings.total_ms,
            }
            if seq_id in failed:
                attributes["duetserve.failure"] = failed[seq_id]
            span = self._tracer.start_span(
                "dataplane.seq", context=extract_traceparent(parent), links=link, start_time=start,
                attributes=attributes,
            )
            if seq_id in failed:
                span.set_status(Status(StatusCode.ERROR, failed[seq_id]))
            span.end(end_time=end)

    def shutdown(self) -> None:
        """Flush and stop the exporter (called once when the worker exits)."""
        if self.provider is not None:
            self.provider.shutdown()
