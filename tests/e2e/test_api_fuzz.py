"""Arbitrary Generate requests through the real gRPC API (both planes, the tiny model on the CPU): each
call ends as the request checks say it must, INVALID_ARGUMENT with a message when they refuse it, else
every completion it asked for with a finish reason and no more tokens than it allowed; afterwards no
request is left running and every KV block is free. The requests are hypothesis's (derandomized: the same
ones every run), chat ones included, sent eight at a time."""

from __future__ import annotations

import asyncio

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.validation import MAX_REQUEST_ID_LEN, InvalidRequest, Limits, validate_generate
from tests.controlplane.test_validation_fuzz import chats, requests
from tests.e2e.conftest import Served, serve
from tests.e2e.test_limits import all_blocks_free, wait_for

COUNT, CHATS, AT_ONCE = 300, 100, 8


def _sample(count: int, strategy: st.SearchStrategy = requests()) -> list[pb.GenerateRequest]:
    """`count` requests drawn by hypothesis, the same each run."""
    drawn: list[pb.GenerateRequest] = []

    @settings(max_examples=count, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(request: pb.GenerateRequest) -> None:
        drawn.append(request)

    collect()
    return drawn


def _verdict(served: Served, request: pb.GenerateRequest) -> str | None:
    """The refusal the request checks give `request` on this server (None: accepted)."""
    engine, plane = served.plane.engine, served.plane
    assert engine.worker is not None
    limits = Limits(vocab_size=engine.worker.model.vocab_size, max_model_len=engine.max_model_len,
                    eos_token_ids=frozenset(engine.worker.model.eos_token_ids))
    try:
        validate_generate(request, engine.tokenizer, limits, plane.chat_template, plane.sampling_defaults)
    except InvalidRequest as exc:
        return str(exc)
    return None


async def _call(served: Served, request: pb.GenerateRequest) -> None:
    refusal = _verdict(served, request)
    finals: dict[int, pb.GenerateResponse] = {}
    tokens: dict[int, int] = {}
    try:
        async for response in served.stub.Generate(request, timeout=60):
            tokens[response.index] = tokens.get(response.index, 0) + len(response.token_ids)
            if response.finish_reason:
                assert response.index not in finals, "a completion ended twice"
                finals[response.index] = response
    except grpc.aio.AioRpcError as exc:
        assert refusal is not None, f"an accepted request failed: {exc.code()} {exc.details()}"
        # the message names a field the checks refuse (with several wrong, the server may name another:
        # a request it encodes on a thread has the cheap checks run first)
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.details(), exc.details()
        return
    assert refusal is None, f"a request the checks refuse ({refusal}) was served"
    n = request.n or 1
    assert sorted(finals) == list(range(n))
    for index, final in finals.items():
        assert final.finish_reason in ("stop", "length"), final.finish_reason
        assert final.completion_tokens == tokens[index] >= 1
        if request.HasField("max_tokens"):
            assert tokens[index] <= request.max_tokens


def _unique_ids(drawn: list[pb.GenerateRequest]) -> list[pb.GenerateRequest]:
    """A valid request_id is made unique (calls run side by side, and a running id is refused); an
    invalid one is kept, to be refused."""
    for i, request in enumerate(drawn):
        rid = request.request_id
        if len(rid) <= MAX_REQUEST_ID_LEN and rid.isprintable():
            request.request_id = f"fuzz-{i}"
    return drawn


async def test_arbitrary_requests_end_as_the_checks_say_and_leak_nothing() -> None:
    drawn = _unique_ids(_sample(COUNT) + _sample(CHATS, chats()))  # chats: the preset's ChatML template
    async with serve("tiny", max_model_len=128) as served:
        for start in range(0, len(drawn), AT_ONCE):
            await asyncio.gather(*(_call(served, request) for request in drawn[start:start + AT_ONCE]))
        await wait_for(lambda: all_blocks_free(served))
        assert served.plane.engine.num_live_requests == 0
        served.scheduler.check_invariants()
    refused = sum(_verdict_free(r) for r in drawn)
    assert 0 < refused < len(drawn)  # both kinds were sent


def _verdict_free(request: pb.GenerateRequest) -> bool:
    """Whether the request is refused by checks that need no server (a quick count of the mix sent)."""
    from controlplane.tokenizer import ByteTokenizer

    from controlplane.chat_template import load_chat_template

    limits = Limits(vocab_size=260, max_model_len=128, eos_token_ids=frozenset({257}))
    try:
        validate_generate(request, ByteTokenizer(), limits, load_chat_template("tiny"))
    except InvalidRequest:
        return True
    return False


@st.composite
def token_calls(draw: st.DrawFn) -> pb.TokenizeRequest | pb.DetokenizeRequest | pb.AbortRequest:
    """A Tokenize (text, chat or both), Detokenize or Abort request with arbitrary fields."""
    from tests.controlplane.test_validation_fuzz import OPTIONAL, text, token_id

    kind = draw(st.sampled_from(["tokenize", "tokenize-chat", "detokenize", "abort"]))
    if kind == "detokenize":
        request = pb.DetokenizeRequest(token_ids=draw(st.lists(token_id, max_size=20)))
        if draw(st.booleans()):
            request.skip_special_tokens = draw(st.booleans())
        return request
    if kind == "abort":
        return pb.AbortRequest(request_id=draw(st.one_of(st.just(""), OPTIONAL["request_id"])))
    request = pb.TokenizeRequest(text=draw(st.one_of(st.just(""), text)) if kind == "tokenize" or
                                 draw(st.booleans()) else "")
    if kind == "tokenize-chat":
        request.chat.CopyFrom(draw(chats()).chat)
    if draw(st.booleans()):
        request.add_special_tokens = draw(st.booleans())
    return request


async def test_arbitrary_tokenize_detokenize_and_abort_calls_end_ok_or_invalid_argument() -> None:
    """Each ends OK or INVALID_ARGUMENT with a message (never another code); a Tokenize answer holds ids of
    the vocabulary and a Detokenize of ids the model has gives text back."""
    drawn = _sample(200, token_calls())
    async with serve("tiny", max_model_len=128) as served:
        for request in drawn:
            call = {pb.TokenizeRequest: served.stub.Tokenize, pb.DetokenizeRequest: served.stub.Detokenize,
                    pb.AbortRequest: served.stub.Abort}[type(request)]
            try:
                reply = await call(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.details(), (exc.code(), request)
                continue
            if isinstance(request, pb.TokenizeRequest):
                assert reply.count == len(reply.token_ids) and all(t < 260 for t in reply.token_ids)
            elif isinstance(request, pb.AbortRequest):
                assert not reply.found  # nothing runs
        assert served.plane.engine.num_live_requests == 0
