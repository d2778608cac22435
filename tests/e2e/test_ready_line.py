"""The control plane's ready line says how the data plane runs passes and whether prefix caching is on."""

from __future__ import annotations

import logging

import pytest

from tests.e2e.conftest import serve


@pytest.mark.parametrize("caching", [True, False])
async def test_ready_line_names_the_launch_mode_and_prefix_caching(caching: bool,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="controlplane.server"):
        async with serve("tiny", enable_prefix_caching=caching):
            pass
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data plane ready")]
    assert "prefill and mixed steps eager" in line  # the CPU builds no piecewise graphs
    assert line.endswith(f"prefix caching {'on' if caching else 'off'}")
