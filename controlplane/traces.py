"""`duetserve traces`: read spans from an OTLP JSON-lines file or a Jaeger query API and print one
request's timeline as a tree with durations (or, with no request named, list the requests found).

Read-only: it never talks to the server, and contacts only the Jaeger URL it is given.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from controlplane.flag_types import checked

REQUEST_ID = "gen_ai.request.id"
CONTROLPLANE = "duetserve-controlplane"
PLANE = "duetserve.plane"  # resource attribute naming the plane, whatever service.name the operator set


@dataclass
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, object] = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)
    plane: str = ""  # the resource's duetserve.plane ('' when the exporter did not say)

    @property
    def of_controlplane(self) -> bool:
        return self.plane == CONTROLPLANE if self.plane else self.service == CONTROLPLANE

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


# ---------------------------------------------------------------- OTLP JSON


def _hex(value: str) -> str:
    if not value:
        return ""
    try:
        int(value, 16)
        if len(value) in (16, 32):
            return value.lower()
    except ValueError:
        pass
    return base64.b64decode(value).hex()  # protobuf's JSON mapping (not OTLP/JSON) writes base64


def _any_value(v: dict) -> object:
    if "arrayValue" in v:
        return [_any_value(x) for x in v["arrayValue"].get("values", [])]
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    return None


def _attrs(items: Iterable[dict]) -> dict[str, object]:
    return {a["key"]: _any_value(a.get("value", {})) for a in items}


def parse_otlp_json(body: dict) -> Iterator[SpanRecord]:
    """Spans of one OTLP/JSON ExportTraceServiceRequest (`{"resourceSpans": [...]}`)."""
    for rs in body.get("resourceSpans", []):
        resource = _attrs(rs.get("resource", {}).get("attributes", []))
        service, plane = str(resource.get("service.name", "")), str(resource.get(PLANE, ""))
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                yield SpanRecord(
                    trace_id=_hex(s["traceId"]), span_id=_hex(s["spanId"]), parent_id=_hex(s.get("parentSpanId", "")),
                    name=s.get("name", ""), service=service, start_ns=int(s.get("startTimeUnixNano", 0)),
                    end_ns=int(s.get("endTimeUnixNano", 0)), attributes=_attrs(s.get("attributes", [])),
                    links=[(_hex(lk["traceId"]), _hex(lk["spanId"])) for lk in s.get("links", [])], plane=plane,
                )


def read_otlp_file(path: str) -> list[SpanRecord]:
    spans: list[SpanRecord] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    spans.extend(parse_otlp_json(json.loads(line)))
                except (ValueError, KeyError) as exc:
                    print(f"{path}:{number}: skipping a malformed line ({exc})", file=sys.stderr)
    return spans


# ---------------------------------------------------------------- Jaeger query API


def parse_jaeger(body: dict) -> Iterator[SpanRecord]:
    """Spans of a Jaeger query API answer (`/api/traces...`: `{"data": [trace, ...]}`)."""
    for trace in body.get("data") or []:
        processes = trace.get("processes", {})
        for s in trace.get("spans", []):
            parent, links = "", []
            for ref in s.get("references") or []:
                if ref.get("refType") == "CHILD_OF" and not parent:
                    parent = ref["spanID"]
                else:
                    links.append((ref["traceID"], ref["spanID"]))
            start = int(s.get("startTime", 0)) * 1000
            process = processes.get(s.get("processID"), {})
            process_tags = {t["key"]: t.get("value") for t in process.get("tags") or []}
            yield SpanRecord(
                trace_id=s["traceID"].rjust(32, "0"), span_id=s["spanID"], parent_id=parent,
                name=s.get("operationName", ""), service=process.get("serviceName", ""),
                start_ns=start, end_ns=start + int(s.get("duration", 0)) * 1000,
                attributes={t["key"]: _jaeger_value(t["key"], t.get("value")) for t in s.get("tags") or []},
                links=links,
                plane=str(process_tags.get(PLANE, "")),
            )


_ARRAY_ATTRIBUTES = {"gen_ai.response.finish_reasons", "gen_ai.request.stop_sequences"}


def _jaeger_value(key: str, value: object) -> object:
    """A Jaeger tag's value; Jaeger stores an OTLP array attribute as its JSON text, decoded back here for
    the attributes that are arrays (a request id may itself look like one)."""
    if key in _ARRAY_ATTRIBUTES and isinstance(value, str) and value.startswith("["):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, list) else value
    return value


def fetch_jaeger(url: str, trace_id: str | None, request_id: str | None, timeout_s: float = 10.0,
                 service: str = CONTROLPLANE, limit: int = 20) -> list[SpanRecord]:
    """Spans from Jaeger: one trace, the trace of a request id, or the latest `limit` requests' traces
    (only their request spans are matched, `span.kind` server: each engine step is a trace of its own,
    and would otherwise fill the limit)."""
    base = url.rstrip("/")

    def get(query: str) -> list[SpanRecord]:
        with urllib.request.urlopen(query, timeout=timeout_s) as response:  # noqa: S310 - the user's URL
            return list(parse_jaeger(json.load(response)))

    if trace_id:
        return get(f"{base}/api/traces/{trace_id}")
    tags = {REQUEST_ID: request_id} if request_id else {"span.kind": "server"}
    params = {"service": service, "limit": str(limit), "tags": json.dumps(tags)}
    spans = get(f"{base}/api/traces?{urllib.parse.urlencode(params)}")
    if not spans and not request_id:  # a Jaeger whose tag filter cannot see the span kind: unfiltered
        spans = get(f"{base}/api/traces?{urllib.parse.urlencode({'service': service, 'limit': str(limit)})}")
    return spans


# ---------------------------------------------------------------- selection and printing


def request_spans(spans: list[SpanRecord]) -> list[SpanRecord]:
    """The calls' spans (one per Generate call: an n > 1 call's later completions, `duetserve.choice_index`,
    are spans inside its trace, not requests of their own)."""
    return sorted((s for s in spans if REQUEST_ID in s.attributes and s.of_controlplane
                   and "duetserve.choice_index" not in s.attributes), key=lambda s: s.start_ns)


def select_trace(spans: list[SpanRecord], trace_id: str | None, request_id: str | None) -> list[SpanRecord]:
    if request_id:
        roots = [s for s in request_spans(spans) if s.attributes[REQUEST_ID] == request_id]
        if not roots:
            return []
        # the latest call the engine took under that id (its span has the sequence id; a call cancelled
        # later has an error.type too): a refused retry of it (ALREADY_EXISTS) has its id as well. Spans
        # without the sequence id: the latest call that did not fail.
        served = ([s for s in roots if "duetserve.seq_id" in s.attributes]
                  or [s for s in roots if "error.type" not in s.attributes] or roots)
        trace_id = served[-1].trace_id
    want = (trace_id or "").lower().rjust(32, "0")
    return [s for s in spans if s.trace_id == want]


_SHOWN = {  # attribute -> label in the tree
    "gen_ai.request.id": "request_id", "gen_ai.response.finish_reasons": "finish",
    "gen_ai.usage.input_tokens": "in", "gen_ai.usage.output_tokens": "out",
    "gen_ai.latency.time_to_first_token": "ttft_s", "duetserve.chunk.num_tokens": "tokens",
    "duetserve.decode.steps": "steps", "duetserve.num_tokens": "tokens", "duetserve.step.id": "step",
    "duetserve.step.mode": "mode", "duetserve.step.measured_ms": "measured_ms", "duetserve.failure": "failure",
}


def _details(span: SpanRecord, by_id: dict[str, SpanRecord]) -> str:
    parts = []
    for key, label in _SHOWN.items():
        if key in span.attributes:
            value = span.attributes[key]
            if isinstance(value, float):
                value = f"{value:.4g}"
            elif isinstance(value, list):
                value = ",".join(map(str, value))
            parts.append(f"{label}={value}")
    for _, span_id in span.links:
        linked = by_id.get(span_id)
        if linked is not None:
            parts.append(f"-> {linked.name} #{linked.attributes.get('duetserve.step.id', '?')}")
    return "  ".join(parts)


def render_tree(trace: list[SpanRecord], context: list[SpanRecord] | None = None) -> str:
    """The trace as an indented tree: name [service] +start_offset duration details."""
    if not trace:
        return ""
    by_id = {s.span_id: s for s in (context or trace)}
    ids = {s.span_id for s in trace}
    children: dict[str, list[SpanRecord]] = {}
    roots = []
    for s in sorted(trace, key=lambda s: s.start_ns):
        (children.setdefault(s.parent_id, []) if s.parent_id in ids else roots).append(s)
    t0 = min(s.start_ns for s in trace)
    lines = [f"trace {trace[0].trace_id}  ({len(trace)} spans)"]

    def walk(span: SpanRecord, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        service = span.service.removeprefix("duetserve-")
        head = f"{prefix}{branch}{span.name} [{service}]"
        lines.append(f"{head:<48} +{(span.start_ns - t0) / 1e6:9.3f} ms {span.duration_ms:9.3f} ms  "
                     f"{_details(span, by_id)}".rstrip())
        kids = children.get(span.span_id, [])
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("" if top else ("    " if last else "│   ")), i == len(kids) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return "\n".join(lines) + "\n"


def render_requests(spans: list[SpanRecord]) -> str:
    rows = [f"{'request id':<24} {'trace id':<32} {'ms':>9}  finish"]
    for s in request_spans(spans):
        finish = ",".join(map(str, s.attributes.get("gen_ai.response.finish_reasons") or [])) or "-"
        rows.append(f"{str(s.attributes[REQUEST_ID]):<24} {s.trace_id:<32} {s.duration_ms:9.3f}  {finish}")
    return "\n".join(rows) + "\n"


def add_traces_flags(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="OTLP JSON-lines file (the server's --otel-exporter file output)")
    source.add_argument("--jaeger", help="Jaeger query base URL, e.g. http://localhost:16686")
    p.add_argument("--service", default=CONTROLPLANE,
                   help=f"with --jaeger: the control plane's service name (OTEL_SERVICE_NAME; default {CONTROLPLANE})")
    p.add_argument("--limit", type=checked(int, "--limit", 1), default=20,
                   help="with --jaeger and no request named: requests to list")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--request-id", help="show the trace of this request (gen_ai.request.id)")
    which.add_argument("--trace-id", help="show this trace")


def run_traces(args: argparse.Namespace) -> int:
    try:
        if args.file:
            spans = read_otlp_file(args.file)
        else:
            spans = fetch_jaeger(args.jaeger, args.trace_id, args.request_id, service=args.service, limit=args.limit)
    except OSError as exc:
        print(f"duetserve traces: {exc}", file=sys.stderr)
        return 1
    if not args.request_id and not args.trace_id:
        sys.stdout.write(render_requests(spans))
        return 0
    trace = select_trace(spans, args.trace_id, args.request_id)
    if not trace:
        print(f"duetserve traces: no spans for {args.request_id or args.trace_id}", file=sys.stderr)
        return 1
    sys.stdout.write(render_tree(trace, spans))
    return 0
