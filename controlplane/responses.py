"""The Generate call's response messages, built from the engine's deltas: tokens, text and logprobs
(each logprob with its token's text), split so that no message passes gRPC's limits.

Only protobuf is built here: no engine calls, no validation, no policy. A message's token texts come
from the function the servicer passes in (the tokenizer's `token_text`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from controlplane.output import RequestDelta
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from shared.messages import TokenLogprobs

PROMPT_LOGPROBS_PER_MESSAGE = 1024  # ~300 KB a message at 20 alternatives: far below any gRPC limit
# a delta merged while a slow client did not read holds every token since: sent as messages of at most
# this many tokens (~1.3 MB at 20 logprob alternatives; one message of ~60k such tokens passes 16 MiB)
TOKENS_PER_MESSAGE = 4096


class ResponseMessages:
    """Builds GenerateResponse messages; `token_text(id)` is a token's own text (see TextTokenizer)."""

    def __init__(self, token_text: Callable[[int], str]) -> None:
        self._token_text = token_text

    def logprobs(self, token_ids: list[int], entries: list[TokenLogprobs] | None) -> list[pb.TokenLogprob]:
        """Each token's logprob entry, with the texts of the token and of its top alternatives."""
        if not entries:
            return []
        text = self._token_text
        return [
            pb.TokenLogprob(
                token_id=token,
                logprob=lp.logprob,
                rank=lp.rank,
                text=text(token),
                top=[pb.TopLogprob(token_id=t, logprob=v, text=text(t))
                     for t, v in zip(lp.top_token_ids, lp.top_logprobs)],
            )
            for token, lp in zip(token_ids, entries)
        ]

    def fits_one(self, delta: RequestDelta) -> bool:
        """Whether `response` alone sends the delta: no prompt logprobs, at most TOKENS_PER_MESSAGE tokens."""
        return not delta.prompt_logprobs and len(delta.token_ids) <= TOKENS_PER_MESSAGE

    def prompt_messages(self, request_id: str, delta: RequestDelta, index: int) -> list[pb.GenerateResponse]:
        """A delta's prompt logprobs as messages of their own, at most PROMPT_LOGPROBS_PER_MESSAGE entries
        each (a long prompt's would pass gRPC's message limits in one); they come before its tokens."""
        assert delta.prompt_logprobs is not None and delta.prompt_token_ids is not None
        targets, entries, step = delta.prompt_token_ids[1:], delta.prompt_logprobs, PROMPT_LOGPROBS_PER_MESSAGE
        return [pb.GenerateResponse(request_id=request_id, index=index,
                                    prompt_logprobs=self.logprobs(targets[i : i + step], entries[i : i + step]))
                for i in range(0, len(entries), step)]

    async def responses(self, request_id: str, delta: RequestDelta,
                        index: int = 0) -> AsyncIterator[pb.GenerateResponse]:
        """The messages of one delta: its prompt logprobs first, when it carries them (built off the event
        loop: thousands of entries take a while), then its tokens."""
        if delta.prompt_logprobs:
            for message in await asyncio.to_thread(self.prompt_messages, request_id, delta, index):
                yield message
        for message in self.token_messages(request_id, delta, index):
            yield message

    def token_messages(self, request_id: str, delta: RequestDelta, index: int = 0) -> list[pb.GenerateResponse]:
        """A delta's tokens as messages of at most TOKENS_PER_MESSAGE tokens: its text with the first, its
        finish and usage with the last."""
        n = len(delta.token_ids)
        if n <= TOKENS_PER_MESSAGE:
            return [self.response(request_id, delta, index)]
        out = []
        for start in range(0, n, TOKENS_PER_MESSAGE):
            end = min(start + TOKENS_PER_MESSAGE, n)
            tokens = dict(token_ids=delta.token_ids[start:end], text=delta.text if start == 0 else "",
                          logprobs=delta.logprobs[start:end] if delta.logprobs is not None else None)
            last = replace(delta, **tokens, prompt_logprobs=None, prompt_token_ids=None) if end == n else None
            out.append(self.response(request_id, last or RequestDelta(**tokens), index))
        return out

    def response(self, request_id: str, delta: RequestDelta, index: int = 0) -> pb.GenerateResponse:
        """One message of a delta's tokens (a small delta's whole), with its finish and usage if it ends."""
        message = pb.GenerateResponse(
            request_id=request_id,
            token_ids=delta.token_ids,
            text=delta.text,
            logprobs=self.logprobs(delta.token_ids, delta.logprobs),
            index=index,
        )
        if delta.finish_reason is not None:
            message.finish_reason = delta.finish_reason
            message.prompt_tokens = delta.prompt_tokens
            message.completion_tokens = delta.completion_tokens
            message.cached_tokens = delta.cached_tokens
            message.stop_reason = delta.stop_reason or ""
        return message

    def output_before_failure(self, request_id: str, delta: RequestDelta,
                              index: int = 0) -> list[pb.GenerateResponse]:
        """A failure the stream took together with output made before it (merged while the stream was
        busy): that output, still the client's, as messages of its own; none for any other delta."""
        if delta.finish_reason != "error" or not (delta.token_ids or delta.text):
            return []
        return self.token_messages(request_id, RequestDelta(delta.token_ids, delta.text, delta.logprobs), index)
