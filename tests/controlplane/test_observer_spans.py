"""The control plane's step spans against an in-memory exporter: what an unsampled step sends the data
plane, and the prefill-chunk spans still open when the server stops."""

from __future__ import annotations

import time
from types import SimpleNamespace

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from controlplane.observer import EngineObserver
from shared.messages import ScheduledSeq, StepPlan
from shared.telemetry import seq_key


def _view(seqs: dict[int, object]) -> SimpleNamespace:
    return SimpleNamespace(num_running=len(seqs), num_waiting=0, seqs=seqs, num_preemptions=0,
                           last_predicted_ms=None)


def _traced() -> tuple[EngineObserver, InMemorySpanExporter]:
    """An observer exporting every span to memory, with request "r" (seq 4) added."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = EngineObserver(provider, None, "m")
    observer.request_added(observer.start_request(), "r", 4)
    return observer, exporter


def test_an_unsampled_step_of_unsampled_requests_sends_no_context() -> None:
    """Nothing of it is exported, so the data plane is not asked to make spans for it."""
    observer = EngineObserver(TracerProvider(sampler=ALWAYS_OFF), None, "m")
    obs = observer.start_request()
    observer.request_added(obs, "r", 4)
    seq = SimpleNamespace(num_outputs=0, num_computed_tokens=8)
    plan = StepPlan(step_id=1, scheduled=[ScheduledSeq(seq_id=4, num_tokens=8)])
    assert observer.step_planned(plan, _view({4: seq}), time.time_ns()) is plan  # no trace context added


def test_a_sampled_request_in_a_step_still_gets_its_data_plane_spans() -> None:
    observer, _ = _traced()
    seq = SimpleNamespace(num_outputs=0, num_computed_tokens=8)
    plan = observer.step_planned(StepPlan(step_id=1, scheduled=[ScheduledSeq(seq_id=4, num_tokens=8)]),
                                 _view({4: seq}), time.time_ns())
    assert plan.trace_context and "traceparent" in plan.trace_context and seq_key(4) in plan.trace_context


def test_shutdown_ends_the_chunk_spans_of_every_step_in_flight() -> None:
    """A request with chunks in two pipelined steps keeps only the newer one on its record; stopping
    the server must end both (the older one leaked, and its data-plane child pointed at nothing)."""
    observer, exporter = _traced()
    for step_id, computed in ((1, 8), (2, 16)):  # two chunks of 8, both steps in flight
        seq = SimpleNamespace(num_outputs=0, num_computed_tokens=computed)
        observer.step_planned(StepPlan(step_id=step_id, scheduled=[ScheduledSeq(seq_id=4, num_tokens=8)]),
                              _view({4: seq}), time.time_ns())
    observer.shutdown()
    chunks = [s for s in exporter.get_finished_spans() if s.name == "prefill_chunk"]
    assert sorted(s.attributes["duetserve.chunk.index"] for s in chunks) == [0, 1]
