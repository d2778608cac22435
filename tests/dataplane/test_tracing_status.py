"""The data plane's spans of a step with a failed sequence are errors (error-based sampling and alerts
see them), and each plane's telemetry resource honours an operator's OTEL_SERVICE_NAME."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from dataplane.tracing import DataplaneTracing
from shared.messages import ScheduledSeq, SeqFailure, StepPlan, StepResult, StepTimings
from shared.telemetry import CONTROLPLANE_SERVICE, seq_key, service_resource, traceparent


def test_a_failed_sequence_makes_its_spans_errors() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    parent = provider.get_tracer("t").start_span("prefill_chunk")
    context = traceparent(parent.get_span_context())
    plan = StepPlan(step_id=3, scheduled=[ScheduledSeq(seq_id=1, num_tokens=5), ScheduledSeq(seq_id=2, num_tokens=1)],
                    trace_context={"traceparent": context, seq_key(1): context, seq_key(2): context})
    result = StepResult(step_id=3, failures=[SeqFailure(seq_id=1, message="CUDA OOM")],
                        timings=StepTimings(total_ms=1.0))
    DataplaneTracing(provider).record(plan, result, time.time_ns())
    spans = {(s.name, s.attributes.get("duetserve.seq_id")): s for s in exporter.get_finished_spans()}
    failed, fine = spans[("dataplane.seq", 1)], spans[("dataplane.seq", 2)]
    assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "CUDA OOM"
    assert fine.status.status_code == StatusCode.UNSET
    execute = spans[("dataplane.execute", None)]
    assert execute.status.status_code == StatusCode.ERROR and "CUDA OOM" in (execute.status.description or "")


def test_the_service_name_is_the_operators_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    plain = service_resource(CONTROLPLANE_SERVICE).attributes
    assert plain["service.name"] == CONTROLPLANE_SERVICE and plain["duetserve.plane"] == CONTROLPLANE_SERVICE
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-llm")
    named = service_resource(CONTROLPLANE_SERVICE).attributes
    assert named["service.name"] == "my-llm" and named["duetserve.plane"] == CONTROLPLANE_SERVICE


def test_the_control_planes_step_span_is_an_error_when_a_sequence_failed() -> None:
    from controlplane.observer import EngineObserver

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = EngineObserver(provider, None, "m")
    view = SimpleNamespace(num_running=1, num_waiting=0, seqs={}, num_preemptions=0, last_predicted_ms=None)
    for step_id, failures in ((1, [SeqFailure(seq_id=4, message="bad plan")]), (2, [])):
        plan = observer.step_planned(StepPlan(step_id=step_id, scheduled=[ScheduledSeq(seq_id=4, num_tokens=1)]),
                                     view, time.time_ns())  # type: ignore[arg-type]
        observer.step_done(plan, StepResult(step_id=step_id, failures=failures, timings=StepTimings(total_ms=1.0)),
                           view)  # type: ignore[arg-type]
    failed, fine = sorted(exporter.get_finished_spans(), key=lambda s: s.attributes["duetserve.step.id"])
    assert failed.status.status_code == StatusCode.ERROR and "bad plan" in (failed.status.description or "")
    assert fine.status.status_code == StatusCode.UNSET
