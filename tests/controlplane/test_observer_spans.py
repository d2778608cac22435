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


def _closed_call(error_type: str | None, error: str | None, finished: str | None = None):  # noqa: ANN202
    observer, exporter = _traced()
    obs = observer.start_request()
    if finished is not None:
        observer.request_finished(obs, finished, 3, 2)
    obs.error, obs.error_type = error, error_type
    observer.close_request(obs)
    (span,) = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    return span


def test_a_client_error_leaves_the_call_span_status_unset() -> None:
    """OTel's RPC conventions: a server span is an error only when the server failed; a bad argument,
    a duplicate id, a refusal under load or a client that went away leaves its status unset, with the
    code and message kept as attributes."""
    from opentelemetry.trace import StatusCode

    for code in ("INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED"):
        span = _closed_call(code, f"{code}: no")
        assert span.status.status_code == StatusCode.UNSET, code
        assert span.attributes["error.type"] == code
        assert span.attributes["duetserve.error.message"] == f"{code}: no"
    assert _closed_call(None, None).attributes["error.type"] == "CANCELLED"  # the client went away
    assert _closed_call(None, None).status.status_code == StatusCode.UNSET
    assert _closed_call("INVALID_ARGUMENT", "x").attributes["rpc.grpc.status_code"] == 3


def test_a_server_fault_makes_the_call_span_an_error() -> None:
    from opentelemetry.trace import StatusCode

    for code, number in (("UNAVAILABLE", 14), ("INTERNAL", 13), ("DEADLINE_EXCEEDED", 4)):
        span = _closed_call(code, f"{code}: data plane gone")
        assert span.status.status_code == StatusCode.ERROR and span.status.description == f"{code}: data plane gone"
        assert span.attributes["error.type"] == code and span.attributes["rpc.grpc.status_code"] == number
        assert "duetserve.error.message" not in span.attributes
    ok = _closed_call(None, None, finished="length")
    assert ok.status.status_code == StatusCode.UNSET and ok.attributes["rpc.grpc.status_code"] == 0
    assert "error.type" not in ok.attributes
