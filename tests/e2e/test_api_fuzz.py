"""Arbitrary Generate requests through the real gRPC API (both planes, the tiny model on the CPU): each
call ends as the request checks say it must, INVALID_ARGUMENT with a message when they refuse it, else
every completion it asked for with a finish reason and no more tokens than it allowed; afterwards no
request is left running and every KV block is free. The requests are hypothesis's (derandomized: the same
ones every run of a given hypothesis version), chat ones included, sent eight at a time. Tokenize,
Detokenize and Abort calls likewise."""

from __future__ import annotations

import asyncio

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.validation import (
    MAX_REQUEST_ID_LEN,
    InvalidRequest,
    Limits,
    ValidatedRequest,
    validate_abort,
    validate_detokenize,
    validate_generate,
    validate_tokenize,
)
from tests.controlplane.test_validation_fuzz import OPTIONAL, chats, requests, text, token_id
from tests.e2e.conftest import Served, serve
from tests.e2e.test_limits import all_blocks_free, wait_for

COUNT, CHATS, AT_ONCE = 300, 100, 8


def _sample(count: int, strategy: st.SearchStrategy = requests()) -> list[pb.GenerateRequest]:
    """`count` requests drawn by hypothesis, derandomized: the same each run of a given hypothesis version."""
    drawn: list[pb.GenerateRequest] = []

    @settings(max_examples=count, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(request: pb.GenerateRequest) -> None:
        drawn.append(request)

    collect()
    return drawn


def _limits(served: Served) -> Limits:
    engine = served.plane.engine
    assert engine.worker is not None
    return Limits(vocab_size=engine.worker.model.vocab_size, max_model_len=engine.max_model_len,
                  eos_token_ids=frozenset(engine.worker.model.eos_token_ids))


def _verdict(served: Served, request: pb.GenerateRequest) -> ValidatedRequest | str:
    """What the request checks make of `request` on this server: the request in engine terms, or the refusal."""
    plane = served.plane
    try:
        return validate_generate(request, plane.engine.tokenizer, _limits(served), plane.chat_template,
                                 plane.sampling_defaults)
    except InvalidRequest as exc:
        return str(exc)


async def _call(served: Served, request: pb.GenerateRequest) -> bool:
    """One Generate call, checked against the request checks' verdict; whether it was refused."""
    verdict = _verdict(served, request)
    finals: dict[int, pb.GenerateResponse] = {}
    tokens: dict[int, int] = {}
    try:
        async for response in served.stub.Generate(request, timeout=60):
            tokens[response.index] = tokens.get(response.index, 0) + len(response.token_ids)
            if response.finish_reason:
                assert response.index not in finals, "a completion ended twice"
                finals[response.index] = response
    except grpc.aio.AioRpcError as exc:
        assert isinstance(verdict, str), f"an accepted request failed: {exc.code()} {exc.details()}"
        # with several fields wrong the server may name another than the checks' first (a request it
        # encodes on a thread has the cheap checks run first): the code and a message are what must hold
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.details(), exc.details()
        return True
    assert not isinstance(verdict, str), f"a request the checks refuse ({verdict}) was served"
    assert sorted(finals) == list(range(verdict.n))
    for index, final in finals.items():
        assert final.finish_reason in ("stop", "length"), final.finish_reason
        assert 1 <= final.completion_tokens == tokens[index] <= verdict.stop.max_tokens  # the effective max_tokens
    return False


def _unique_ids(drawn: list[pb.GenerateRequest]) -> list[pb.GenerateRequest]:
    """A valid request_id is made unique (calls run side by side, and a running id is refused); an
    invalid one is kept, to be refused, and an unset one stays unset (the server makes one)."""
    for i, request in enumerate(drawn):
        rid = request.request_id
        if rid and len(rid) <= MAX_REQUEST_ID_LEN and rid.isprintable():
            request.request_id = f"fuzz-{i}"
    return drawn


async def test_arbitrary_requests_end_as_the_checks_say_and_leak_nothing() -> None:
    drawn = _unique_ids(_sample(COUNT) + _sample(CHATS, chats()))  # chats: the preset's ChatML template
    refused = 0
    async with serve("tiny", max_model_len=128) as served:
        for start in range(0, len(drawn), AT_ONCE):
            refused += sum(await asyncio.gather(*(_call(served, r) for r in drawn[start:start + AT_ONCE])))
        await wait_for(lambda: all_blocks_free(served))
        assert served.plane.engine.num_live_requests == 0
        served.scheduler.check_invariants()
    assert len(drawn) // 10 < refused < len(drawn) * 9 // 10  # both kinds, each a fair share


@st.composite
def token_calls(draw: st.DrawFn) -> pb.TokenizeRequest | pb.DetokenizeRequest | pb.AbortRequest:
    """A Tokenize (text, chat or both), Detokenize or Abort request with arbitrary fields."""
    kind = draw(st.sampled_from(["tokenize", "tokenize-chat", "detokenize", "abort"]))
    if kind == "detokenize":
        request = pb.DetokenizeRequest(token_ids=draw(st.lists(token_id, max_size=20)))
        if draw(st.booleans()):
            request.skip_special_tokens = draw(st.booleans())
        return request
    if kind == "abort":
        return pb.AbortRequest(request_id=draw(st.one_of(st.just(""), OPTIONAL["request_id"])))
    with_text = kind == "tokenize" or draw(st.booleans())  # a chat with text too is refused
    request = pb.TokenizeRequest(text=draw(st.one_of(st.just(""), text)) if with_text else "")
    if kind == "tokenize-chat":
        request.chat.CopyFrom(draw(chats()).chat)
    if draw(st.booleans()):
        request.add_special_tokens = draw(st.booleans())
    return request


async def test_arbitrary_tokenize_detokenize_and_abort_calls_end_as_the_checks_say() -> None:
    """Each ends OK exactly when the request checks accept it (else INVALID_ARGUMENT with a message), and
    its answer is the tokenizer's: the ids of the text (or of the chat as its template renders it), the
    text of the ids; an Abort finds nothing (nothing runs)."""
    drawn = _sample(200, token_calls())
    answered = 0
    async with serve("tiny", max_model_len=128) as served:
        tokenizer, template = served.plane.engine.tokenizer, served.plane.chat_template
        for request in drawn:
            call, check = {
                pb.TokenizeRequest: (served.stub.Tokenize, lambda r: validate_tokenize(r, template)),
                pb.DetokenizeRequest: (served.stub.Detokenize, lambda r: validate_detokenize(r, _limits(served))),
                pb.AbortRequest: (served.stub.Abort, validate_abort),
            }[type(request)]
            try:
                expected = check(request)
            except InvalidRequest:
                expected = None
            try:
                reply = await call(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                assert expected is None, f"{type(request).__name__} the checks accept failed: {exc.details()}"
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.details(), (exc.code(), request)
                continue
            assert expected is not None, f"a {type(request).__name__} the checks refuse was answered"
            answered += 1
            if isinstance(request, pb.TokenizeRequest):
                assert list(reply.token_ids) == tokenizer.encode(*expected) and reply.count == len(reply.token_ids)
            elif isinstance(request, pb.DetokenizeRequest):
                assert reply.text == tokenizer.decode(*expected)
            else:
                assert not reply.found
        assert served.plane.engine.num_live_requests == 0
    assert len(drawn) // 10 < answered < len(drawn) * 9 // 10
