"""Queue limits: a full queue is Overloaded (retry later); a request over a limit on its own is
BeyondLimits, empty queue or not (a retry can never succeed)."""

from __future__ import annotations

import pytest

from controlplane.admission import BeyondLimits, Overloaded, QueueLimits
from controlplane.sequence import Sequence, StopParams
from shared.messages import SamplingParams


def queued(n: int, tokens: int) -> list[Sequence]:
    return [Sequence(seq_id=i, request_id=f"r{i}", prompt_token_ids=[5] * tokens, sampling=SamplingParams(),
                     stop=StopParams(max_tokens=1), arrival_time=0.0) for i in range(n)]


def test_full_queue_is_overloaded_and_an_oversized_request_is_beyond_limits() -> None:
    limits = QueueLimits(max_requests=2, max_tokens=80)
    limits.check([], 80, 1)
    limits.check(queued(1, 30), 50, 1)
    with pytest.raises(Overloaded, match="max_queued_requests 2"):
        limits.check(queued(2, 1), 1, 1)
    with pytest.raises(Overloaded, match="max_queued_tokens 80"):
        limits.check(queued(1, 31), 50, 1)
    with pytest.raises(BeyondLimits, match="3 completions.*max_queued_requests 2"):
        limits.check([], 1, 3)
    with pytest.raises(BeyondLimits, match="81 tokens .its prompt.*max_queued_tokens 80"):
        limits.check([], 81, 1)
    with pytest.raises(BeyondLimits, match="100 tokens .its prompt x 2 completions"):
        limits.check(queued(1, 1), 50, 2)
