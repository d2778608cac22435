"""Turns sampled tokens into what a client streams: text deltas, stop strings, the final usage.

One `OutputProcessor` per request. It detokenises incrementally, finds stop strings in the text
(which ends the request), and holds back the tail that could still become a stop string. It makes
no scheduling decision: a stop string is reported to the caller, who finishes the sequence.
"""

from __future__ import annotations

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
