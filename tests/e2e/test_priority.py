"""Priority scheduling through the gRPC API: under --scheduling-policy priority a later request with
a lower priority value is served before an earlier one; under fcfs a priority is refused with
INVALID_ARGUMENT; GetModelInfo says which policy runs; `duetserve generate --priority` sends it."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from controlplane.cli import build_parser
from controlplane.client import UsageError, request_from_args
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import Served, generate, serve
from tests.e2e.test_cancel import LONG, wait_idle

PROMPT = {"token_ids": {"ids": [5, 9, 13, 17, 21, 25, 29, 33]}, "ignore_eos": True, "max_tokens": 8, "temperature": 0.0}


async def wait_for(condition, timeout_s: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def first_token_times(served: Served, request_id: str, priority: int, out: dict[str, float]) -> list[int]:
    tokens: list[int] = []
    async for response in served.stub.Generate(pb.GenerateRequest(request_id=request_id, priority=priority,
                                                                   **PROMPT)):
        if response.token_ids and request_id not in out:
            out[request_id] = time.monotonic()
        tokens.extend(response.token_ids)
    return tokens


async def test_a_later_request_with_a_lower_priority_value_is_served_first() -> None:
    async with serve("tiny", max_num_seqs=1, scheduling_policy="priority") as served:
        info = await served.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.scheduling_policy == "priority"
        blocker = served.stub.Generate(pb.GenerateRequest(request_id="blocker", **LONG))
        await blocker.read()  # it holds the only running slot
        firsts: dict[str, float] = {}
        low = asyncio.create_task(first_token_times(served, "low", 5, firsts))
        await wait_for(lambda: len(served.scheduler.waiting) == 1)
        high = asyncio.create_task(first_token_times(served, "high", -5, firsts))
        await wait_for(lambda: len(served.scheduler.waiting) == 2)
        assert [s.request_id for s in served.scheduler.waiting] == ["high", "low"]
        assert (await served.stub.Abort(pb.AbortRequest(request_id="blocker"))).found
        low_tokens, high_tokens = await asyncio.gather(low, high)
        assert firsts["high"] < firsts["low"]
        assert low_tokens == high_tokens and len(low_tokens) == 8  # same prompt, greedy
        blocker.cancel()
        await wait_idle(served)
        assert served.scheduler.allocator.num_free == served.scheduler.allocator.num_blocks


async def test_fcfs_refuses_a_priority_and_reports_its_policy() -> None:
    async with serve("tiny") as served:
        info = await served.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.scheduling_policy == "fcfs"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, priority=3, **PROMPT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--scheduling-policy priority" in (err.value.details() or "")
        ok = await generate(served.stub, priority=0, **PROMPT)  # the default is valid everywhere
        assert ok.final is not None and ok.final.completion_tokens == 8


def test_generate_cli_sends_the_priority_and_token_rules() -> None:
    args = build_parser().parse_args(["generate", "hi", "--priority", "-2", "--logit-bias", "5=-100",
                                      "--logit-bias", "7=2.5", "--allowed-token-ids", "5,7,9"])
    request = request_from_args(args)
    assert request.priority == -2
    assert dict(request.logit_bias) == {5: -100.0, 7: 2.5} and list(request.allowed_token_ids) == [5, 7, 9]
    for bad in ("5", "x=1", "5=abc", "-3=1"):
        with pytest.raises(UsageError, match="ID=BIAS"):
            request_from_args(build_parser().parse_args(["generate", "hi", f"--logit-bias={bad}"]))
    with pytest.raises(UsageError, match="comma-separated token ids"):
        request_from_args(build_parser().parse_args(["generate", "hi", "--allowed-token-ids", "1,x"]))
    serve_args = build_parser().parse_args(["serve", "--scheduling-policy", "priority"])
    assert serve_args.scheduling_policy == "priority"
