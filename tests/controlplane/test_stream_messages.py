"""A delta merged while a slow client did not read holds every token since: the API sends it as
messages of at most TOKENS_PER_MESSAGE tokens (one message of tens of thousands of tokens with top
logprobs would pass gRPC's 16 MiB limit and end the call), text with the first, finish with the last."""

from __future__ import annotations

from controlplane import responses
from controlplane.output import RequestDelta
from controlplane.responses import ResponseMessages
from shared.messages import TokenLogprobs

MESSAGES = ResponseMessages(lambda token_id: f"<{token_id}>")


def test_a_large_merged_delta_is_split_and_loses_nothing(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(responses, "TOKENS_PER_MESSAGE", 4)
    ids = list(range(10, 20))
    delta = RequestDelta(ids, "all the text", [TokenLogprobs(logprob=-float(t)) for t in ids], finish_reason="length",
                         prompt_tokens=7, completion_tokens=10, cached_tokens=2)
    messages = MESSAGES.token_messages("r", delta, index=1)
    assert [len(m.token_ids) for m in messages] == [4, 4, 2]
    assert [t for m in messages for t in m.token_ids] == ids
    assert [-lp.logprob for m in messages for lp in m.logprobs] == [float(t) for t in ids]
    assert [m.text for m in messages] == ["all the text", "", ""] and {m.index for m in messages} == {1}
    assert [m.finish_reason for m in messages] == ["", "", "length"]
    assert (messages[-1].prompt_tokens, messages[-1].completion_tokens, messages[-1].cached_tokens) == (7, 10, 2)
    small = RequestDelta([5], "x", None)
    assert [list(m.token_ids) for m in MESSAGES.token_messages("r", small)] == [[5]]


def test_every_logprob_entry_carries_its_tokens_text() -> None:
    """The sampled token's and each top alternative's, from the tokenizer's token_text; prompt logprobs
    too (their targets are the prompt's tokens after the first)."""
    entry = TokenLogprobs(logprob=-0.5, rank=2, top_token_ids=[7, 3], top_logprobs=[-0.1, -0.5])
    (message,) = MESSAGES.token_messages("r", RequestDelta([3], "x", [entry]))
    (got,) = message.logprobs
    assert (got.token_id, got.text, got.rank) == (3, "<3>", 2)
    assert [(t.token_id, t.text) for t in got.top] == [(7, "<7>"), (3, "<3>")]
    prompt = RequestDelta([], "", None, prompt_token_ids=[1, 4, 6], prompt_logprobs=[entry, entry])
    (first,) = MESSAGES.prompt_messages("r", prompt, 0)
    assert [(e.token_id, e.text) for e in first.prompt_logprobs] == [(4, "<4>"), (6, "<6>")]
