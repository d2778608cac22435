"""A plane's stop waits a bounded time for its last spans: an exporter stuck retrying (an unreachable
collector) is stopped, and one that answers is flushed in full."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from shared.telemetry import BoundedTracerProvider


class RetryingExporter(SpanExporter):
    """Retries each export until `shutdown` (as the OTLP exporter does against a collector that is down),
    or answers at once when `reachable`."""

    def __init__(self, reachable: bool) -> None:
        self.reachable = reachable
        self.exported: list[str] = []
        self.shutdowns = 0
        self._stop = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.reachable:
            self._stop.wait(30.0)
            return SpanExportResult.FAILURE
        self.exported += [s.name for s in spans]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shutdowns += 1
        self._stop.set()


def _provider(exporter: SpanExporter) -> BoundedTracerProvider:
    provider = BoundedTracerProvider(exporter, export_timeout_s=0.3, shutdown_on_exit=False)
    for i in range(3):
        provider.get_tracer("t").start_span(f"s{i}").end()
    return provider


def test_an_unreachable_collector_holds_the_stop_only_the_timeout() -> None:
    exporter = RetryingExporter(reachable=False)
    provider = _provider(exporter)
    started = time.monotonic()
    provider.shutdown()
    assert time.monotonic() - started < 10.0  # the exporter would retry for 30 s without the bound
    assert exporter.shutdowns == 1 and exporter.exported == []


def test_a_reachable_collector_gets_every_span_before_the_stop() -> None:
    exporter = RetryingExporter(reachable=True)
    provider = _provider(exporter)
    provider.shutdown()
    assert sorted(exporter.exported) == ["s0", "s1", "s2"] and exporter.shutdowns == 1
