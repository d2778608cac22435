"""Start-up fallbacks of the worker on a CPU: an optional speed-up that cannot be built leaves the
worker serving, with a warning, instead of failing its start."""

from __future__ import annotations

import pytest

from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan


@pytest.mark.parametrize("failing", ["build", "capture"])
def test_a_failed_capture_leaves_eager_passes_and_a_warning(failing: str, monkeypatch, caplog) -> None:  # noqa: ANN001
    """Piecewise graphs are a speed-up: buffers the GPU cannot hold, or a capture it refuses, must not
    stop the worker."""
    import logging

    import dataplane.worker as worker_module
    from shared.config import DataplaneConfig

    built: list[object] = []

    class Refused:
        def __init__(self, *args: object, **kwargs: object) -> None:
            built.append(self)
            if failing == "build":
                raise RuntimeError("operation not permitted when stream is capturing (out of memory)")

        def capture(self) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(worker_module, "piecewise_possible", lambda *a: True)
    monkeypatch.setattr(worker_module, "PiecewiseGraphs", Refused)
    with caplog.at_level(logging.WARNING, logger="dataplane.worker"):
        loaded = worker_module.load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=64))
    assert len(built) == 1 and loaded.runner.pieces is None and loaded.ready.piecewise_max_tokens == 0
    assert "could not be captured (RuntimeError: operation not permitted" in caplog.text
    out = loaded.runner.execute(StepPlan(step_id=0, new_requests=[NewRequest(
        seq_id=1, token_ids=[5, 6, 7], num_prompt_tokens=3, block_ids=[0], sampling=SamplingParams(temperature=0.0))],
        scheduled=[ScheduledSeq(seq_id=1, num_tokens=3)]))
    assert [o.seq_id for o in out.outputs] == [1] and len(out.outputs[0].token_ids) == 1
