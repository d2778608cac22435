"""`duetserve traces`: the OTLP JSON file both planes write, and a (canned, in-process) Jaeger query API."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controlplane.cli import main
from shared.config import TelemetryConfig
from tests.e2e.conftest import generate, serve


async def test_file_exporter_and_timeline_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spans = tmp_path / "spans.jsonl"
    async with serve("tiny", max_num_batched_tokens=8, telemetry=TelemetryConfig(exporter="file",
                                                                                  file=str(spans))) as served:
        for rid in ("first", "second"):
            await generate(served.stub, request_id=rid, text="Hello, traces!", max_tokens=3, ignore_eos=True)
        await generate(served.stub, request_id="pair", text="Hi", max_tokens=2, n=2, ignore_eos=True)
    lines = spans.read_text().splitlines()
    services = {a["value"]["stringValue"] for line in lines for rs in json.loads(line)["resourceSpans"]
                for a in rs["resource"]["attributes"] if a["key"] == "service.name"}
    assert services == {"duetserve-controlplane", "duetserve-dataplane"}  # both planes, one file

    assert main(["traces", "--file", str(spans)]) == 0
    listing = capsys.readouterr().out
    assert "first" in listing and "second" in listing and "length" in listing
    pair = [line for line in listing.splitlines() if line.startswith("pair ")]
    assert len(pair) == 1 and pair[0].endswith("length,length"), listing  # one call, both completions

    assert main(["traces", "--file", str(spans), "--request-id", "second"]) == 0
    tree = capsys.readouterr().out.splitlines()
    assert tree[1].startswith("text_completion tiny [controlplane]") and "request_id=second" in tree[1]
    names = [line.split(" [")[0] for line in tree[2:]]
    assert names[0] == "├── queue"
    assert names.count("├── prefill_chunk") == 2 and names.count("│   └── dataplane.seq") == 2
    assert names[-2:] == ["└── decode", "    └── dataplane.seq"]
    assert all(" ms " in line for line in tree[1:])
    assert "-> scheduler.step #" in next(line for line in tree if "prefill_chunk" in line)
    assert main(["traces", "--file", str(spans), "--request-id", "nope"]) == 1


def _jaeger_trace(service: str = "duetserve-controlplane") -> dict:
    def span(sid: str, name: str, parent: str | None, start: int, dur: int, pid: str, tags: list) -> dict:
        refs = [{"refType": "CHILD_OF", "traceID": "abc123", "spanID": parent}] if parent else []
        return {"traceID": "abc123", "spanID": sid, "operationName": name, "references": refs,
                "startTime": start, "duration": dur, "tags": tags, "processID": pid}

    rid = [{"key": "gen_ai.request.id", "type": "string", "value": "req-7"},
           {"key": "gen_ai.response.finish_reasons", "type": "string", "value": "[\"stop\"]"}]
    plane = [{"key": "duetserve.plane", "type": "string", "value": "duetserve-controlplane"}]
    return {"data": [{"traceID": "abc123", "processes": {"p1": {"serviceName": service, "tags": plane},
                                                         "p2": {"serviceName": "duetserve-dataplane"}},
                      "spans": [span("01", "text_completion tiny", None, 1_000, 9_000, "p1", rid),
                                span("02", "prefill_chunk", "01", 2_000, 3_000, "p1", []),
                                span("03", "dataplane.seq", "02", 2_500, 2_000, "p2", []),
                                span("04", "decode", "01", 5_000, 4_000, "p1", [])]}]}


@contextmanager
def fake_jaeger(service: str = "duetserve-controlplane", kind_filter: bool = True) -> Iterator[tuple[str, list[str]]]:
    """`kind_filter` False: a Jaeger whose tag filter cannot see the span kind (it answers no trace)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)
            blind = not kind_filter and "span.kind" in urllib.parse.unquote(self.path)
            body = json.dumps({"data": []} if blind else _jaeger_trace(service)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_jaeger_query_api(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_jaeger() as (url, seen):
        assert main(["traces", "--jaeger", url, "--request-id", "req-7"]) == 0
        assert main(["traces", "--jaeger", url, "--trace-id", "abc123"]) == 0
    path, query = seen[0].split("?")
    params = urllib.parse.parse_qs(query)
    assert path == "/api/traces" and params["service"] == ["duetserve-controlplane"]
    assert json.loads(params["tags"][0]) == {"gen_ai.request.id": "req-7"}
    assert seen[1] == "/api/traces/abc123"
    out = capsys.readouterr().out
    first = out.split("trace ")[1].splitlines()
    assert first[1].startswith("text_completion tiny [controlplane]") and "9.000 ms" in first[1]
    assert first[2].startswith("├── prefill_chunk [controlplane]") and "+    1.000 ms" in first[2]
    assert first[3].startswith("│   └── dataplane.seq [dataplane]")
    assert first[4].startswith("└── decode [controlplane]")
    assert "finish=stop " in first[1] + " "  # Jaeger keeps an array attribute as its JSON text: decoded


def test_jaeger_listing_finds_requests_under_any_service_name(capsys: pytest.CaptureFixture[str]) -> None:
    """With no request named, only request spans are queried (each engine step is a trace of its own and
    filled the limit); a control plane run under OTEL_SERVICE_NAME is queried by --service and its
    spans known by the resource's duetserve.plane; finish reasons read as words, not characters."""
    with fake_jaeger("llm-prod") as (url, seen):
        assert main(["traces", "--jaeger", url, "--service", "llm-prod", "--limit", "5"]) == 0
        assert main(["traces", "--jaeger", url, "--service", "llm-prod", "--request-id", "req-7"]) == 0
    params = urllib.parse.parse_qs(seen[0].split("?")[1])
    assert params["service"] == ["llm-prod"] and params["limit"] == ["5"]
    assert json.loads(params["tags"][0]) == {"span.kind": "server"}
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["req-7", "abc123".rjust(32, "0"), "9.000", "stop"]
    assert out[3].startswith("llm-prod text_completion tiny") or "text_completion tiny [llm-prod]" in out[3]


def test_a_jaeger_that_cannot_filter_by_kind_is_asked_again_unfiltered(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_jaeger(kind_filter=False) as (url, seen):
        assert main(["traces", "--jaeger", url]) == 0
    assert len(seen) == 2 and "tags" not in urllib.parse.parse_qs(seen[1].split("?")[1])
    assert "req-7" in capsys.readouterr().out


def test_a_request_ids_trace_is_the_served_calls_not_a_refused_retrys() -> None:
    """A retry refused with ALREADY_EXISTS has the same request id (and error.type); the id names the
    served call, even one cancelled later. A request id that looks like a JSON array stays a string."""
    from controlplane.traces import SpanRecord, _jaeger_value, select_trace

    def root(trace: str, start: int, **attrs: object) -> SpanRecord:
        return SpanRecord(trace, "s" + trace, "", "text_completion m", "duetserve-controlplane", start, start + 5,
                          {"gen_ai.request.id": "r", **attrs})

    served, refused = root("1" * 32, 0), root("2" * 32, 10, **{"error.type": "ALREADY_EXISTS"})
    assert select_trace([served, refused], None, "r") == [served]
    # the served call was cancelled later (error.type CANCELLED): its sequence id still names it
    cancelled = root("3" * 32, 0, **{"error.type": "CANCELLED", "duetserve.seq_id": 4})
    assert select_trace([cancelled, refused], None, "r") == [cancelled]
    assert _jaeger_value("gen_ai.request.id", "[1,2]") == "[1,2]"
    assert _jaeger_value("gen_ai.response.finish_reasons", '["stop","length"]') == ["stop", "length"]
