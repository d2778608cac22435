"""Admission limits: how much work may wait in the queue before new requests are refused.

A request that would push the waiting queue past `max_requests` sequences or `max_tokens` tokens
still to prefill is refused at once with `Overloaded` (the API maps it to RESOURCE_EXHAUSTED: retry
later), so the queue never grows without bound; one that exceeds a limit on its own, even with the
queue empty, with `BeyondLimits` (INVALID_ARGUMENT: a retry can never succeed). This module only
counts; it does not schedule or reorder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controlplane.sequence import Sequence


class Overloaded(RuntimeError):
    """The queue is full; the message says which limit was hit."""


class BeyondLimits(RuntimeError):
    """The request alone exceeds a queue limit, so no queue state would admit it."""


@dataclass(frozen=True)
class QueueLimits:
    max_requests: int
    max_tokens: int

    def check(self, waiting: Iterable[Sequence], num_new_tokens: int, count: int = 1) -> None:
        """Raise Overloaded if `count` more requests of `num_new_tokens` tokens each do not fit now,
        BeyondLimits if they would not fit an empty queue either."""
        if count > self.max_requests:
            raise BeyondLimits(f"this request asks for {count} completions, more than the server ever queues "
                               f"(max_queued_requests {self.max_requests})")
        if count * num_new_tokens > self.max_tokens:
            prompts = "its prompt" if count == 1 else f"its prompt x {count} completions"
            raise BeyondLimits(f"this request's {count * num_new_tokens} tokens ({prompts}) exceed what the "
                               f"server ever queues (max_queued_tokens {self.max_tokens})")
        queued = list(waiting)
        if len(queued) + count > self.max_requests:
            more = "" if count == 1 else f" and this request asks for {count} completions"
            raise Overloaded(f"server overloaded: {len(queued)} requests are queued{more} "
                             f"(max_queued_requests {self.max_requests})")
        tokens = sum(seq.num_tokens for seq in queued)
        if tokens + count * num_new_tokens > self.max_tokens:
            prompts = "this prompt" if count == 1 else f"this prompt x {count} completions"
            raise Overloaded(
                f"server overloaded: {tokens} queued tokens + {count * num_new_tokens} in {prompts} exceed "
                f"max_queued_tokens {self.max_tokens}"
            )
