"""Turns sampled tokens into what a client streams: text deltas, stop strings, the final usage.

One `OutputProcessor` per request. It detokenises incrementally, finds stop strings in the text
(which ends the request), and holds back the tail that could still become a stop string. It makes
no scheduling decision: a stop string is reported to the caller, who finishes the sequence.
`DeltaCollector` holds what a request's stream has not taken yet, merging what piles up.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from controlplane.tokenizer import TokenStream
from shared.messages import TokenLogprobs


@dataclass
class RequestDelta:
    """One streamed message's worth of output."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # on a completion's first message when asked for: entry i for prompt token i + 1 (`prompt_token_ids`)
    prompt_logprobs: list[TokenLogprobs] | None = None
    prompt_token_ids: list[int] | None = None
    retryable: bool = False  # an error of the server's state (data plane lost, shutting down): UNAVAILABLE


@dataclass
class OutputProcessor:
    stream: TokenStream
    stop_strings: tuple[str, ...] = ()
    include_stop_str: bool = False  # keep the stop string that ended the text (vLLM's include_stop_str_in_output)
    text: str = ""  # all text decoded so far (stop string excluded once found, unless included)
    _sent: int = 0  # characters of `text` already streamed
    _stop_found: str | None = field(default=None)

    @property
    def _holdback(self) -> int:
        return max((len(s) for s in self.stop_strings), default=1) - 1

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Detokenise new tokens; returns the stop string that ended the text, if one appeared."""
        if self._stop_found is not None:
            return self._stop_found
        for token_id in token_ids:
            piece = self.stream.step(token_id)
            if not piece:
                continue
            start = max(0, len(self.text) - self._holdback)
            self.text += piece
            for stop in self.stop_strings:
                at = self.text.find(stop, start)
                if at != -1:
                    self.text = self.text[: at + len(stop)] if self.include_stop_str else self.text[:at]
                    self._stop_found = stop
                    return stop
        return None

    def take_text(self, final: bool) -> str:
        """The text not yet streamed; keeps back a possible stop-string prefix unless final."""
        end = len(self.text) if final or self._stop_found else max(self._sent, len(self.text) - self._holdback)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta


def merge_deltas(first: RequestDelta, then: RequestDelta) -> RequestDelta:
    """One delta with both's output, as if produced at once: tokens, text and logprobs joined, the
    prompt logprobs of whichever has them, the end (finish, usage, error) of the later one."""
    merged = RequestDelta(first.token_ids + then.token_ids, first.text + then.text,
                          None if first.logprobs is None and then.logprobs is None
                          else (first.logprobs or []) + (then.logprobs or []))
    merged.prompt_logprobs = first.prompt_logprobs if first.prompt_logprobs is not None else then.prompt_logprobs
    merged.prompt_token_ids = first.prompt_token_ids if first.prompt_token_ids is not None else then.prompt_token_ids
    end = then if then.finish_reason is not None else first
    merged.finish_reason, merged.stop_reason, merged.error = end.finish_reason, end.stop_reason, end.error
    merged.prompt_tokens, merged.completion_tokens, merged.cached_tokens = (
        end.prompt_tokens, end.completion_tokens, end.cached_tokens)
    merged.retryable = end.retryable
    return merged


class DeltaCollector:
    """A request's output not yet taken by its stream. Deltas put while the stream is busy (sending
    the previous message) merge into one, as vLLM's RequestOutputCollector does: a stream slower than
    the engine gets fewer, larger messages instead of a growing backlog of one-token messages. A merge
    costs what the new delta holds, not the backlog: the pending lists are the collector's own
    (copied once) and grow in place, its text is kept in pieces and joined when taken.

    With `interval` > 1 (SGLang's --stream-interval) the stream is woken only once that many tokens
    are pending, or the output ended; the first delta always goes at once (time to first token)."""

    def __init__(self, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"stream interval must be >= 1, got {interval}")
        self.interval = interval
        self._pending: RequestDelta | None = None
        self._texts: list[str] = []  # the pending text, in pieces, once a merge happened
        self._ready = asyncio.Event()
        self._taken = 0  # deltas the stream has taken
        self.merges = 0  # deltas folded into a pending one

    def put_nowait(self, delta: RequestDelta) -> None:
        pending = self._pending
        if pending is None:
            self._pending = pending = delta
        else:
            if not self._texts:  # the first merge: own the lists (the first's may be the engine's)
                pending = self._pending = merge_deltas(pending, RequestDelta([], ""))
                self._texts.append(pending.text)
            pending.token_ids.extend(delta.token_ids)
            self._texts.append(delta.text)
            if delta.logprobs is not None:
                if pending.logprobs is None:
                    pending.logprobs = []
                pending.logprobs.extend(delta.logprobs)
            if pending.prompt_logprobs is None and delta.prompt_logprobs is not None:
                pending.prompt_logprobs, pending.prompt_token_ids = delta.prompt_logprobs, delta.prompt_token_ids
            if delta.finish_reason is not None:
                pending.finish_reason, pending.stop_reason, pending.error = (
                    delta.finish_reason, delta.stop_reason, delta.error)
                pending.prompt_tokens, pending.completion_tokens, pending.cached_tokens = (
                    delta.prompt_tokens, delta.completion_tokens, delta.cached_tokens)
                pending.retryable = delta.retryable
            self.merges += 1
        if (self.interval == 1 or not self._taken or pending.finish_reason is not None
                or len(pending.token_ids) >= self.interval):
            self._ready.set()

    async def get(self) -> RequestDelta:
        await self._ready.wait()
        delta, self._pending = self._pending, None
        self._ready.clear()
        self._taken += 1
        assert delta is not None
        if self._texts:
            delta.text = "".join(self._texts)
            self._texts = []
        return delta

    def qsize(self) -> int:
        return 0 if self._pending is None else 1
