"""The control plane's ready line says how the data plane runs passes, whether prefix caching is on,
which scheduling policy orders the queue, where the chat template came from and which sampling
defaults the model's generation config set."""

from __future__ import annotations

import logging

import pytest

from tests.e2e.conftest import serve


@pytest.mark.parametrize("caching,policy", [(True, "fcfs"), (False, "priority")])
async def test_ready_line_names_the_launch_mode_prefix_caching_and_policy(caching: bool, policy: str,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="controlplane.server"):
        async with serve("tiny", enable_prefix_caching=caching, scheduling_policy=policy):
            pass
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data plane ready")]
    assert "prefill and mixed steps eager" in line  # the CPU builds no piecewise graphs
    assert line.endswith(f"prefix caching {'on' if caching else 'off'}, {policy} scheduling, "
                         "chat template: preset tiny (ChatML), sampling defaults: neutral")


async def test_ready_line_says_when_there_is_no_chat_template(checkpoints, caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.INFO, logger="controlplane.server"):
        async with serve(str(checkpoints["llama"])):
            pass
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data plane ready")]
    assert line.endswith("chat template: none, sampling defaults: neutral")
