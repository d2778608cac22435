"""Serving metrics: OpenTelemetry instruments, pushed over OTLP and/or served as Prometheus text.

OpenTelemetry instrument names may not contain ':', so instruments are named `duetserve.<name>`
and the Prometheus endpoint shows them as `duetserve:<name>` (vLLM's `vllm:<name>` style); counters
get `_total`. Values are recorded by `controlplane.observer`; this module holds no serving logic,
and its HTTP server answers only GET /metrics.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    MetricReader,
    PeriodicExportingMetricReader,
    Sum,
)

from controlplane.sequence import FinishReason
from shared.config import TelemetryConfig
from shared.telemetry import CONTROLPLANE_SERVICE, SHUTDOWN_EXPORT_TIMEOUT_S, otlp_endpoint_url, service_resource

log = logging.getLogger(__name__)

PREFIX = "duetserve."
_LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
              10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
          10.0, 20.0, 40.0, 80.0)
_E2E_S = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
          120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_N = (1.0, 2.0, 5.0, 10.0, 20.0)  # vLLM's request_params_n buckets
# the codes a Generate call is refused with (their request_refused series are exported from the start); a
# deadline that passes once the engine has the request ends it as an abort (request_success{abort})
REFUSAL_CODES = ("INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "UNAVAILABLE")
_TOKENS = tuple(float(m * 10**e) for e in range(7) for m in (1, 2, 5))  # 1, 2, 5, 10, ... 5M (vLLM's 1-2-5)


class ServingMetrics:
    """The instruments; `model_name` is a label on every point, as in vLLM."""

    def __init__(self, config: TelemetryConfig, model_name: str) -> None:
        self.labels = {"model_name": model_name}
        self._prometheus = InMemoryMetricReader() if config.metrics_port else None
        readers: list[MetricReader] = [self._prometheus] if self._prometheus else []
        if config.metrics_exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            endpoint = otlp_endpoint_url(config.otlp_endpoint) if config.otlp_endpoint else None
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint)))
        self.provider = MeterProvider(
            metric_readers=readers, resource=service_resource(CONTROLPLANE_SERVICE)
        )
        self.enabled = bool(readers)
        m = self.provider.get_meter("duetserve.controlplane")
        # histogram name -> (description, bounds): rendered empty until its first point (render_prometheus)
        self._histograms: dict[str, tuple[str, tuple[float, ...]]] = {}

        def hist(name: str, description: str, bounds: tuple[float, ...], unit: str = "s") -> HistogramInstrument:
            self._histograms[PREFIX + name] = (description, bounds)
            return m.create_histogram(PREFIX + name, unit=unit, description=description,
                                      explicit_bucket_boundaries_advisory=bounds)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token", _LATENCY_S)
        self.itl = hist("inter_token_latency_seconds", "Gap between two outputs", _ITL_S)
        self.e2e = hist("e2e_request_latency_seconds", "Request latency", _E2E_S)
        self.queue_time = hist("request_queue_time_seconds", "Time waiting", _E2E_S)
        # per finished request, as vLLM's: its phases' times (prefill: first scheduled to first token;
        # decode: first token to the end; inference: both), time per output token, and its token counts
        self.prefill_time = hist("request_prefill_time_seconds", "Time from first scheduled to first token", _E2E_S)
        self.decode_time = hist("request_decode_time_seconds", "Time from first token to the last", _E2E_S)
        self.inference_time = hist("request_inference_time_seconds", "Time from first scheduled to the last token",
                                   _E2E_S)
        self.tpot = hist("request_time_per_output_token_seconds", "Decode time over the output tokens after the first",
                         _ITL_S)
        self.request_prompt_tokens = hist("request_prompt_tokens", "Prompt tokens of a request", _TOKENS, unit="")
        self.request_generation_tokens = hist("request_generation_tokens", "Output tokens of a request", _TOKENS,
                                              unit="")
        # vLLM's request parameters: n per call (when it is accepted), max_tokens per finished completion
        self.request_params_n = hist("request_params_n", "Completions a call asked for (n)", _N, unit="")
        self.request_params_max_tokens = hist("request_params_max_tokens", "max_tokens of a finished request",
                                              _TOKENS, unit="")
        self.prompt_tokens = m.create_counter(PREFIX + "prompt_tokens", description="Prefilled prompt tokens")
        self.generation_tokens = m.create_counter(PREFIX + "generation_tokens", description="Generated tokens")
        # vLLM's prefix_cache_queries / prefix_cache_hits: prompt tokens of requests when admitted (their
        # prefix-cache lookup), and how many of them the lookup found in the cache
        self.prefix_cache_queries = m.create_counter(PREFIX + "prefix_cache_queries",
                                                     description="Prompt tokens looked up in the prefix cache")
        self.prefix_cache_hits = m.create_counter(PREFIX + "prefix_cache_hits",
                                                  description="Prompt tokens found in the prefix cache")
        self.request_success = m.create_counter(PREFIX + "request_success", description="Finished requests")
        self.preemptions = m.create_counter(PREFIX + "num_preemptions", description="Preempted sequences")
        # Generate calls that ended with an error before the engine took them, by gRPC code: a bad
        # argument, a duplicate id, a refusal under load, a server not ready (a client that went away is
        # not counted; a request the engine took and failed is request_success{finished_reason="error"})
        self.request_refused = m.create_counter(PREFIX + "request_refused",
                                                description="Generate calls refused before the engine took them")
        # engine steps by mode (aggregated | multiplexed): how many, their measured time (phase total;
        # a multiplexed step also prefill and decode, its look-ahead passes together), tokens scheduled
        self.steps = m.create_counter(PREFIX + "steps", description="Engine steps finished")
        self.step_time = m.create_counter(PREFIX + "step_time_milliseconds", unit="ms",
                                          description="Measured time of the finished steps")
        self.step_tokens = m.create_counter(PREFIX + "step_tokens", description="Tokens the finished steps scheduled")
        self.running = m.create_gauge(PREFIX + "num_requests_running", description="Requests in the batch")
        self.waiting = m.create_gauge(PREFIX + "num_requests_waiting", description="Requests queued")
        self.kv_usage = m.create_gauge(PREFIX + "kv_cache_usage_perc", description="KV blocks in use (0-1)")
        self.sm_prefill = m.create_gauge(PREFIX + "sm_split_prefill", description="SMs given to prefill (0: all)")
        self.sm_decode = m.create_gauge(PREFIX + "sm_split_decode", description="SMs given to decode (0: all)")
        self.predictor_error = m.create_gauge(PREFIX + "predictor_abs_pct_error",
                                              description="|predicted - measured| / measured step time, percent")
        # every series is exported from the start, at 0, as vLLM's are, not after its first event (a rate
        # or increase() would miss that event, and an absent() alert would fire): counters here, and
        # each finish reason's; histograms with no point yet are rendered empty (render_prometheus)
        for counter in (self.prompt_tokens, self.generation_tokens, self.prefix_cache_queries,
                        self.prefix_cache_hits, self.preemptions):
            counter.add(0, self.labels)
        for reason in FinishReason:
            self.request_success.add(0, {**self.labels, "finished_reason": reason.value})
        for code in REFUSAL_CODES:
            self.request_refused.add(0, {**self.labels, "code": code})
        self._server: ThreadingHTTPServer | None = None
        self._address = (config.metrics_host, config.metrics_port)
        self.port = 0

    def set_predictor_error(self, abs_pct_error: float) -> None:
        """For the latency predictor: the last step's |predicted - measured| / measured, in percent."""
        self.predictor_error.set(abs_pct_error, self.labels)

    # ------------------------------------------------------------------ Prometheus

    def render_prometheus(self) -> str:
        if self._prometheus is None:
            return ""
        data = self._prometheus.get_metrics_data()
        if data is None:
            return ""
        metrics = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
        seen = {m.name for m in metrics}
        empty = [render_empty_histogram(name, description, bounds, self.labels)
                 for name, (description, bounds) in self._histograms.items() if name not in seen]
        return "".join(render_metric(m) for m in metrics) + "".join(empty)

    def serve(self) -> None:
        """Start the Prometheus endpoint (if configured) on a daemon thread."""
        host, port = self._address
        if self._prometheus is None or self._server is not None:
            return
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = metrics.render_prometheus().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("metrics: " + format, *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # the last OTLP export gets the time spans get (an unreachable collector held the stop ~7 s)
        self.provider.shutdown(timeout_millis=SHUTDOWN_EXPORT_TIMEOUT_S * 1000)


# ---------------------------------------------------------------- Prometheus text format


def prometheus_name(otel_name: str) -> str:
    if otel_name.startswith(PREFIX):
        otel_name = "duetserve:" + otel_name[len(PREFIX):]
    return "".join(c if c.isalnum() or c in "_:" else "_" for c in otel_name)


def _labels(attributes: Iterable[tuple[str, object]], extra: tuple[str, str] | None = None) -> str:
    pairs = [(prometheus_name(str(k)), str(v)) for k, v in attributes]
    if extra is not None:
        pairs.append(extra)
    if not pairs:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for k, v in pairs]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _histogram_lines(name: str, attrs: list[tuple[str, object]], bounds: Iterable[float], counts: Iterable[int],
                     total: float, count: int) -> list[str]:
    """One histogram point's lines: cumulative buckets (the last +Inf), the sum and the count."""
    lines, cumulative = [], 0
    for bound, n in zip([*bounds, math.inf], counts):
        cumulative += n
        lines.append(f"{name}_bucket{_labels(attrs, ('le', _num(float(bound))))} {cumulative}")
    return lines + [f"{name}_sum{_labels(attrs)} {_num(total)}", f"{name}_count{_labels(attrs)} {count}"]


def render_empty_histogram(otel_name: str, description: str, bounds: tuple[float, ...],
                           labels: dict[str, str]) -> str:
    """A histogram no value was recorded in yet: every bucket, the sum and the count at 0."""
    name = prometheus_name(otel_name)
    lines = [f"# HELP {name} {description}", f"# TYPE {name} histogram",
             *_histogram_lines(name, sorted(labels.items()), bounds, [0] * (len(bounds) + 1), 0.0, 0)]
    return "".join(line + "\n" for line in lines)


def render_metric(metric: Metric) -> str:
    name = prometheus_name(metric.name)
    data = metric.data
    lines: list[str] = []
    if isinstance(data, Histogram):
        lines += [f"# HELP {name} {metric.description}", f"# TYPE {name} histogram"]
        for p in data.data_points:
            lines += _histogram_lines(name, sorted(p.attributes.items()), p.explicit_bounds, p.bucket_counts,
                                      p.sum, p.count)
    elif isinstance(data, Sum) and data.is_monotonic:
        if not name.endswith("_total"):
            name += "_total"
        lines += [f"# HELP {name} {metric.description}", f"# TYPE {name} counter"]
        lines += [f"{name}{_labels(sorted(p.attributes.items()))} {_num(p.value)}" for p in data.data_points]
    elif isinstance(data, (Gauge, Sum)):
        lines += [f"# HELP {name} {metric.description}", f"# TYPE {name} gauge"]
        lines += [f"{name}{_labels(sorted(p.attributes.items()))} {_num(p.value)}" for p in data.data_points]
    return "".join(line + "\n" for line in lines)
