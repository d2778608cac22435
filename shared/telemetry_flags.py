"""The command-line flags of telemetry, shared by `duetserve serve` and `python -m dataplane`, and the
inverse (config -> flags) the launcher uses so the data plane exports where the control plane does.

Defaults come from the standard OTEL_* variables, read once here at start-up. No serving logic.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from shared.config import TelemetryConfig

_TRACE_EXPORTERS = ("none", "console", "otlp", "file")


def _env_exporter(env: Mapping[str, str]) -> str:
    value = env.get("OTEL_TRACES_EXPORTER", "none").split(",")[0].strip().lower()
    return value if value in _TRACE_EXPORTERS else "none"


def add_trace_flags(p: argparse.ArgumentParser, env: Mapping[str, str] = os.environ) -> None:
    p.add_argument("--otel-exporter", choices=_TRACE_EXPORTERS, default=_env_exporter(env),
                   help="where spans go: none, console, otlp (OTLP/gRPC) or file (OTLP JSON lines). "
                        "Default: $OTEL_TRACES_EXPORTER, else none")
    p.add_argument("--otlp-endpoint", default=None,
                   help="OTLP/gRPC endpoint, e.g. http://jaeger:4317 (default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                        " or $OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4317)")
    p.add_argument("--otel-file", default=None, help="OTLP JSON-lines file for --otel-exporter file "
                                                     "(read it with `duetserve traces --file`)")


def add_metrics_flags(p: argparse.ArgumentParser, env: Mapping[str, str] = os.environ) -> None:
    metrics = env.get("OTEL_METRICS_EXPORTER", "none").strip().lower()
    p.add_argument("--otel-metrics-exporter", choices=("none", "otlp"),
                   default=metrics if metrics == "otlp" else "none",
                   help="also push metrics over OTLP/gRPC to --otlp-endpoint (default: $OTEL_METRICS_EXPORTER)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus text metrics on this port at /metrics; 0 = off (default)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")


def telemetry_from_args(args: argparse.Namespace) -> TelemetryConfig:
    return TelemetryConfig(
        exporter=args.otel_exporter, otlp_endpoint=args.otlp_endpoint, file=args.otel_file,
        metrics_exporter=getattr(args, "otel_metrics_exporter", "none"),
        metrics_port=getattr(args, "metrics_port", 0), metrics_host=getattr(args, "metrics_host", "127.0.0.1"),
    )


def trace_args(config: TelemetryConfig) -> list[str]:
    """The flags that give another process the same trace export (metrics stay with the caller)."""
    args = ["--otel-exporter", config.exporter]
    if config.otlp_endpoint:
        args += ["--otlp-endpoint", config.otlp_endpoint]
    if config.file:
        args += ["--otel-file", config.file]
    return args
