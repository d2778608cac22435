"""OpenTelemetry set-up both planes share: tracer providers, exporters, and how trace context crosses
the ZeroMQ socket inside `StepPlan.trace_context`.

The wire convention (no schema change: `trace_context` is a str -> str map):
- `traceparent` / `tracestate`: the W3C context of the control plane's `scheduler.step` span; the
  data plane parents its `dataplane.execute` span to it.
- `seq.<seq_id>`: a W3C traceparent, present only for sequences the control plane wants a data-plane
  span for; that span joins the request's own trace (the control plane decides which, the data plane
  just follows).
An empty map means "not traced": the data plane then does no tracing work at all.

This module must not import torch or anything of either plane, and holds no serving logic.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Mapping, Sequence

from google.protobuf.json_format import MessageToDict
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.config import TelemetryConfig

log = logging.getLogger(__name__)

SEQ_KEY_PREFIX = "seq."
CONTROLPLANE_SERVICE = "duetserve-controlplane"
DATAPLANE_SERVICE = "duetserve-dataplane"

_propagator = TraceContextTextMapPropagator()
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


# ---------------------------------------------------------------- context on the wire


def traceparent(ctx: SpanContext) -> str:
    """The W3C traceparent header of a span context (what the propagator would write)."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def seq_key(seq_id: int) -> str:
    return f"{SEQ_KEY_PREFIX}{seq_id}"


def inject(context: Context | None = None) -> dict[str, str]:
    """The W3C headers of `context` (default: the current one) as a plain dict."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str]) -> Context:
    """A context whose parent is the remote span named by `carrier`'s traceparent (or an empty one)."""
    return _propagator.extract(carrier)


def extract_traceparent(value: str) -> Context:
    return _propagator.extract({"traceparent": value})


def seq_contexts(trace_context: Mapping[str, str]) -> dict[int, str]:
    """The per-sequence traceparents of a plan's trace context, keyed by seq id."""
    out: dict[int, str] = {}
    for key, value in trace_context.items():
        if key.startswith(SEQ_KEY_PREFIX):
            try:
                out[int(key[len(SEQ_KEY_PREFIX):])] = value
            except ValueError:
                log.warning("ignoring malformed trace context key %r", key)
    return out


# ---------------------------------------------------------------- exporters and providers


def _hex_ids(node: object) -> None:
    """OTLP/JSON writes trace and span ids as hex, where protobuf's JSON mapping writes base64."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)


def spans_to_otlp_json(spans: Sequence[ReadableSpan]) -> dict:
    """An OTLP/JSON ExportTraceServiceRequest (`{"resourceSpans": [...]}`) for `spans`."""
    body = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    _hex_ids(body)
    return body


class OtlpJsonFileExporter(SpanExporter):
    """Appends one OTLP/JSON ExportTraceServiceRequest per line; safe for two processes appending."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        import json

        line = (json.dumps(spans_to_otlp_json(spans), separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            os.write(self._fd, line)  # one write per line: O_APPEND keeps lines whole
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def otlp_endpoint_url(endpoint: str) -> str:
    """`host:port` means plaintext (as collectors and Jaeger listen by default); a scheme is kept."""
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def make_span_exporter(config: TelemetryConfig) -> SpanExporter | None:
    if config.exporter == "none":
        return None
    if config.exporter == "console":
        return ConsoleSpanExporter()
    if config.exporter == "file":
        assert config.file is not None
        return OtlpJsonFileExporter(config.file)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    endpoint = otlp_endpoint_url(config.otlp_endpoint) if config.otlp_endpoint else None
    return OTLPSpanExporter(endpoint=endpoint)


def service_resource(service_name: str) -> Resource:
    """The resource of one plane's telemetry: `service.name` is the plane's unless the operator set one
    (OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES, which the OTel SDK says win); `duetserve.plane`
    names the plane either way."""
    name = str(Resource.create({}).attributes.get("service.name", ""))  # what the environment says
    if not name or name.startswith("unknown_service"):
        name = service_name
    return Resource.create({"service.name": name, "duetserve.plane": service_name})


# How long a plane's stop waits for its last spans to be exported. An unreachable collector held each
# plane ~7 s (the OTLP exporter retries for OTEL_EXPORTER_OTLP_TIMEOUT, 10 s), one after the other.
SHUTDOWN_EXPORT_TIMEOUT_S = 2.0


class _OnceStoppedExporter(SpanExporter):
    """Delegates to an exporter; `shutdown` reaches it once, so a stop that cut its retries short can
    be followed by the batch processor's own shutdown."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self._stopped = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export(spans)

    def shutdown(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class BoundedTracerProvider(TracerProvider):
    """A TracerProvider whose `shutdown` waits `export_timeout_s` for the spans still batched to be
    exported, then stops the exporter (its retries end) and drops them with a warning; it returns within
    half a second more."""

    def __init__(self, exporter: SpanExporter, export_timeout_s: float = SHUTDOWN_EXPORT_TIMEOUT_S,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._exporter = _OnceStoppedExporter(exporter)
        self._export_timeout_s = export_timeout_s
        self.add_span_processor(BatchSpanProcessor(self._exporter))

    def shutdown(self) -> None:
        stopping = threading.Thread(target=super().shutdown, name="otel-shutdown", daemon=True)
        stopping.start()
        stopping.join(self._export_timeout_s)
        if stopping.is_alive():
            log.warning("tracing: the last spans were not exported within %.0f s (is the collector reachable?); "
                        "dropped", self._export_timeout_s)
            self._exporter.shutdown()  # the retry loop sees this at once; the stop then ends quickly
            stopping.join(0.5)


def make_tracer_provider(config: TelemetryConfig, service_name: str) -> TracerProvider | None:
    """A private (not global) provider batching spans to the configured exporter; None when off."""
    exporter = make_span_exporter(config)
    if exporter is None:
        return None
    provider = BoundedTracerProvider(exporter, resource=service_resource(service_name))
    log.info("tracing: %s exporter, service %s", config.exporter, service_name)
    return provider
