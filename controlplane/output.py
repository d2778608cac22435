"""Turns sampled tokens into what a client streams: text deltas, stop strings, the final usage.

One `OutputProcessor` per request. It detokenises incrementally, finds stop strings in the text
(which ends the request), and holds back the tail that could still become a stop string. It makes
no scheduling decision: a stop string is reported to the caller, who finishes the sequence.
`DeltaCollector` holds what a request's stream has not taken yet, merging what piles up; `cut_at_stop`
cuts a step's tokens (and the sequence's output) at the one whose text completed a stop string.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controlplane.tokenizer import TokenStream
from shared.messages import TokenLogprobs

if TYPE_CHECKING:
    from controlplane.sequence import Sequence


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
    # stop strings count only once more than min_tokens tokens were made, as EOS and stop tokens (masked
    # in the sampler until then) and as vLLM's: a string ending in the text of the first min_tokens tokens
    # is never matched
    min_tokens: int = 0
    text: str = ""  # all text decoded so far (stop string excluded once found, unless included)
    _sent: int = 0  # characters of `text` already streamed
    _stop_found: str | None = field(default=None)
    _num_tokens: int = 0  # output tokens added so far
    # of the last add_tokens call's tokens, how many are kept once a stop string is found: up to and
    # including the one whose text completed it (None: no stop string)
    stop_kept: int | None = None

    @property
    def _holdback(self) -> int:
        """Characters kept back while they may begin a stop string that is cut from the text (none when
        the stop string stays in it: what was sent is never taken back)."""
        if self.include_stop_str:
            return 0
        return max((len(s) for s in self.stop_strings), default=1) - 1

    def add_tokens(self, token_ids: list[int], stop_token_ended: bool = False) -> str | None:
        """Detokenise new tokens; returns the stop string that ended the text, if one appeared.
        `stop_token_ended`: the last token ended the sequence (EOS or a stop token id); its text is left
        out unless stop strings are kept in the output, as vLLM's detokenizer does."""
        if self._stop_found is not None:
            self.stop_kept = 0
            return self._stop_found
        silent = len(token_ids) if stop_token_ended and not self.include_stop_str else 0
        for kept, token_id in enumerate(token_ids, 1):
            self._num_tokens += 1
            if kept == silent:
                break
            piece = self.stream.step(token_id)
            if not piece:
                continue
            before = len(self.text)
            self.text += piece
            if self._num_tokens <= self.min_tokens:
                continue
            # each stop string only where it ends in the new piece (text before it was searched already, or
            # came before min_tokens); of several, the one that ends first (then starts first), which is the
            # one a token-by-token search finds, however the text is split into tokens
            found = [(at, stop) for stop in self.stop_strings
                     if (at := self.text.find(stop, max(0, before - len(stop) + 1))) != -1]
            if found:
                at, stop = min(found, key=lambda hit: (hit[0] + len(hit[1]), hit[0]))
                self.text = self.text[: at + len(stop)] if self.include_stop_str else self.text[:at]
                self._stop_found, self.stop_kept = stop, kept
                return stop
        return None

    def take_text(self, final: bool) -> str:
        """The text not yet streamed; keeps back a possible stop-string prefix unless final."""
        end = len(self.text) if final or self._stop_found else max(self._sent, len(self.text) - self._holdback)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta


def _own_copy(delta: RequestDelta) -> RequestDelta:
    """The delta with lists of its own (a delta's may be the engine's), to grow in place."""
    return dataclasses.replace(delta, token_ids=list(delta.token_ids),
                               logprobs=None if delta.logprobs is None else list(delta.logprobs))


def _absorb(into: RequestDelta, then: RequestDelta) -> None:
    """`then`'s output after `into`'s, in place (the text excepted: callers join it): tokens and
    logprobs appended, the prompt logprobs of whichever has them, the end (finish, usage, error) of
    `then` when it ended."""
    into.token_ids.extend(then.token_ids)
    if then.logprobs is not None:
        if into.logprobs is None:
            into.logprobs = []
        into.logprobs.extend(then.logprobs)
    if into.prompt_logprobs is None:
        into.prompt_logprobs, into.prompt_token_ids = then.prompt_logprobs, then.prompt_token_ids
    if then.finish_reason is not None:
        into.finish_reason, into.stop_reason, into.error = then.finish_reason, then.stop_reason, then.error
        into.prompt_tokens, into.completion_tokens, into.cached_tokens = (
            then.prompt_tokens, then.completion_tokens, then.cached_tokens)
        into.retryable = then.retryable


def merge_deltas(first: RequestDelta, then: RequestDelta) -> RequestDelta:
    """One delta with both's output, as if produced at once; neither input changes."""
    merged = _own_copy(first)
    _absorb(merged, then)
    merged.text = first.text + then.text
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
            if not self._texts:  # the first merge: lists of its own, its text in pieces from now on
                pending = self._pending = _own_copy(pending)
                self._texts.append(pending.text)
            _absorb(pending, delta)
            self._texts.append(delta.text)
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


def cut_at_stop(seq: Sequence, new_ids: list[int], new_logprobs: list[TokenLogprobs] | None,
                kept: int | None) -> tuple[list[int], list[TokenLogprobs] | None]:
    """An update's tokens up to the one whose text completed a stop string (several come at once from a
    look-ahead step), and the sequence's output cut the same way, as a stop token cuts it (`_append_tokens`),
    so neither the stream nor the usage counts tokens past the stop."""
    if kept is None or kept >= len(new_ids):
        return new_ids, new_logprobs
    dropped = len(new_ids) - kept
    out = seq.output_token_ids
    if len(out) >= len(new_ids) and out[len(out) - len(new_ids):] == new_ids:  # the update ends the output
        with_logprobs = len(seq.output_logprobs) == len(out)
        del out[len(out) - dropped:]
        if with_logprobs:
            del seq.output_logprobs[len(seq.output_logprobs) - dropped:]
    return new_ids[:kept], new_logprobs[:kept] if new_logprobs is not None else None
