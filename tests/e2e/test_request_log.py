"""--enable-log-requests: one access-log line per finished request, and none without it."""

from __future__ import annotations

import logging
import re

import pytest

from tests.e2e.conftest import generate, serve


async def test_each_finished_request_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    ask = {"token_ids": {"ids": list(range(5, 45))}, "max_tokens": 3, "ignore_eos": True, "temperature": 0.0}
    with caplog.at_level(logging.INFO, logger="controlplane.observer"):
        async with serve("tiny", log_requests=True) as served:
            await generate(served.stub, request_id="first", **ask)
            await generate(served.stub, request_id="again", **ask)
            await generate(served.stub, request_id="pair", n=2, **ask)  # completion i logged as pair#i
        async with serve("tiny") as served:
            await generate(served.stub, request_id="quiet", **ask)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert len(lines) == 4, lines
    pattern = (r"request ([\w#]+) finished length: prompt 40 tokens \((\d+) cached\), completion 3, "
               r"queue [\d.]+ ms, TTFT [\d.]+ ms, e2e [\d.]+ ms$")
    found = [re.match(pattern, line) for line in lines]
    assert all(found), lines
    assert [(m.group(1), m.group(2)) for m in found if m][:2] == [("first", "0"), ("again", "32")]
    assert sorted(m.group(1) for m in found[2:] if m) == ["pair#0", "pair#1"]
