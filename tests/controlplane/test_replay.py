"""Trace loading and the serving metrics of `duetserve simulate`."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.replay import RequestRecord, load_trace, summarise

TRACES = Path(__file__).resolve().parents[1] / "data/traces"


def test_load_trace_parses_seven_digit_timestamps() -> None:
    trace = load_trace(TRACES / "azure_llm_2023_code_300.csv")
    assert len(trace) == 300 and trace[0].arrival_s == 0.0
    assert (trace[0].prompt_tokens, trace[0].output_tokens) == (4808, 10)
    assert trace[1].arrival_s == pytest.approx(0.052)  # 18:17:04.0319600 - 18:17:03.9799600
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:]))
    assert len(load_trace(TRACES / "azure_llm_2023_conv_300.csv", limit=10)) == 10


@pytest.mark.parametrize(("text", "error"), [
    ("a,b\n1,2\n", "not an Azure LLM trace CSV: no column TIMESTAMP, ContextTokens, GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,12,4\n2023-11-16 18:17:04.1,abc,3\n",
     r"bad\.csv:3: invalid literal"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,12,4\n", r"bad\.csv:2: time data 'yesterday'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,0,4\n", "token counts must be positive"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,5\n", r"bad\.csv:2: int\(\) argument"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
])
def test_a_file_that_is_not_a_trace_is_refused_with_its_line(tmp_path: Path, text: str, error: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(ValueError, match=error):
        load_trace(bad)


def test_summarise_by_hand() -> None:
    # Sent at 0; tokens arrive at 0.1 (1), 0.2 (2: a look-ahead burst), 0.3 (1): TTFT 100 ms,
    # TPOT (0.3 - 0.1) / 3 = 66.7 ms, ITL 50, 50, 100 ms. With time_scale 0.5 every time doubles.
    r = RequestRecord(0, prompt_tokens=10, max_tokens=4, sent=0.0, chunks=[(0.1, 1), (0.2, 2), (0.3, 1)],
                      completion_tokens=4, finish_reason="length")
    m = summarise([r], time_scale=0.5, ttft_slo_ms=250.0, tbt_slo_ms=150.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)  # type: ignore[index]
    assert m["tpot_ms"]["mean"] == pytest.approx(400.0 / 3)  # type: ignore[index]
    assert sorted([m["itl_ms"]["p50"], m["itl_ms"]["p99"]]) == pytest.approx([100.0, 200.0])  # type: ignore[index]
    assert m["duration_s"] == pytest.approx(0.6) and m["output_throughput_tok_s"] == pytest.approx(4 / 0.6)
    assert m["goodput_req_s"] == pytest.approx(1 / 0.6)
    strict = summarise([r], time_scale=0.5, ttft_slo_ms=100.0, tbt_slo_ms=150.0)
    assert strict["goodput_req_s"] == 0.0 and strict["slo_attainment"] == 0.0
