"""A delta merged while a slow client did not read holds every token since: the API sends it as
messages of at most TOKENS_PER_MESSAGE tokens (one message of tens of thousands of tokens with top
logprobs would pass gRPC's 16 MiB limit and end the call), text with the first, finish with the last."""

from __future__ import annotations

from controlplane import api
from controlplane.output import RequestDelta
from shared.messages import TokenLogprobs


def test_a_large_merged_delta_is_split_and_loses_nothing(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(api, "TOKENS_PER_MESSAGE", 4)
    ids = list(range(10, 20))
    delta = RequestDelta(ids, "all the text", [TokenLogprobs(logprob=-float(t)) for t in ids], finish_reason="length",
                         prompt_tokens=7, completion_tokens=10, cached_tokens=2)
    messages = api._token_messages("r", delta, index=1)
    assert [len(m.token_ids) for m in messages] == [4, 4, 2]
    assert [t for m in messages for t in m.token_ids] == ids
    assert [-lp.logprob for m in messages for lp in m.logprobs] == [float(t) for t in ids]
    assert [m.text for m in messages] == ["all the text", "", ""] and {m.index for m in messages} == {1}
    assert [m.finish_reason for m in messages] == ["", "", "length"]
    assert (messages[-1].prompt_tokens, messages[-1].completion_tokens, messages[-1].cached_tokens) == (7, 10, 2)
    small = RequestDelta([5], "x", None)
    assert [list(m.token_ids) for m in api._token_messages("r", small)] == [[5]]
