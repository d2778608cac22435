"""Parallel sampling through the gRPC API: n completions of one prompt, streamed together and tagged
by index; each equals the single completion with its seed; Abort, a cancelled call and a deadline
end them all and free their blocks; bad n and reused ids get clear statuses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import Served, generate, serve
from tests.e2e.test_cancel import LONG, wait_idle

PROMPT = {"token_ids": {"ids": [5, 9, 13, 17, 21, 25, 29, 33, 37, 41]}, "ignore_eos": True}


async def choices(served: Served, timeout: float | None = None,
                  **fields: object) -> dict[int, tuple[list[int], pb.GenerateResponse]]:
    """Each index's tokens and its final message (exactly one per index)."""
    tokens: dict[int, list[int]] = {}
    finals: dict[int, pb.GenerateResponse] = {}
    async for response in served.stub.Generate(pb.GenerateRequest(**fields), timeout=timeout):
        assert response.index not in finals, f"a message for completion {response.index} after its last"
        tokens.setdefault(response.index, []).extend(response.token_ids)
        if response.finish_reason:
            finals[response.index] = response
    return {i: (tokens[i], finals[i]) for i in finals}


def all_free(served: Served) -> bool:
    return served.scheduler.allocator.num_free == served.scheduler.allocator.num_blocks


async def test_n_completions_are_the_single_completions_of_their_seeds() -> None:
    async with serve("tiny") as served:
        got = await choices(served, **PROMPT, max_tokens=12, temperature=1.0, seed=40, n=4)
        assert sorted(got) == [0, 1, 2, 3]
        for index, (tokens, final) in got.items():
            single = await generate(served.stub, **PROMPT, max_tokens=12, temperature=1.0, seed=40 + index)
            assert tokens == single.token_ids, index
            assert final.finish_reason == "length" and final.completion_tokens == 12 and final.prompt_tokens == 10
        assert len({tuple(t) for t, _ in got.values()}) > 1  # other seeds, other samples
        greedy = await choices(served, **PROMPT, max_tokens=6, temperature=0.0, n=3)
        assert len({tuple(t) for t, _ in greedy.values()}) == 1 and len(greedy) == 3
        await wait_idle(served)
        assert all_free(served) and served.plane.engine.num_live_requests == 0


async def test_abort_cancel_and_deadline_end_every_completion() -> None:
    async with serve("tiny") as served:
        call = served.stub.Generate(pb.GenerateRequest(request_id="many", n=3, **LONG))
        finals = {}
        async for response in call:
            if len(served.scheduler.seqs) == 3 and not finals and response.token_ids:
                assert (await served.stub.Abort(pb.AbortRequest(request_id="many"))).found
            if response.finish_reason:
                finals[response.index] = response.finish_reason
        assert finals == {0: "abort", 1: "abort", 2: "abort"}
        await wait_idle(served)
        assert all_free(served)

        call = served.stub.Generate(pb.GenerateRequest(request_id="gone", n=3, **LONG))
        async for _ in call:
            if len(served.scheduler.seqs) == 3:
                break
        call.cancel()
        await wait_idle(served)
        assert not served.scheduler.seqs and all_free(served)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await choices(served, 0.5, n=2, request_id="late", **LONG)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_idle(served)
        assert not served.scheduler.seqs and all_free(served) and served.plane.engine.num_live_requests == 0


async def test_an_abort_while_the_prompt_is_encoded_ends_every_completion() -> None:
    """Aborted before its text is encoded, an n=3 request still ends each completion with a message."""
    async with serve("tiny") as served:
        tokenizer = served.plane.engine.tokenizer
        encode, started = tokenizer.encode, asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow(*args: object, **kwargs: object) -> list[int]:
            loop.call_soon_threadsafe(started.set)
            time.sleep(0.5)  # encoding runs in a worker thread: the Abort arrives meanwhile
            return encode(*args, **kwargs)

        tokenizer.encode = slow  # type: ignore[method-assign]
        observer, closed = served.plane.engine.observer, []
        close = observer.close_request
        observer.close_request = lambda obs: closed.append((obs.finish_reason, obs.error)) or close(obs)  # type: ignore
        call = served.stub.Generate(pb.GenerateRequest(request_id="enc", text="hello", n=3, max_tokens=4))
        await started.wait()
        assert (await served.stub.Abort(pb.AbortRequest(request_id="enc"))).found
        finals = {}
        async for response in call:
            if response.finish_reason:
                finals[response.index] = response.finish_reason
        assert finals == {0: "abort", 1: "abort", 2: "abort"}
    assert closed == [("abort", None)]  # the call's span ends as an abort (status OK), not a cancelled call


async def test_bad_n_and_reused_ids_are_refused() -> None:
    async with serve("tiny") as served:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await choices(served, **PROMPT, n=17)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be at most 16" in err.value.details()
        running = served.stub.Generate(pb.GenerateRequest(request_id="busy", n=2, **LONG))
        await running.read()
        for n in (1, 2):  # the id of a running request for several completions is taken, whatever n
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await choices(served, **PROMPT, request_id="busy", n=n, max_tokens=2)
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, n
        single = served.stub.Generate(pb.GenerateRequest(request_id="one", **LONG))
        await single.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await choices(served, **PROMPT, request_id="one", n=2, max_tokens=2)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        running.cancel()
        single.cancel()
        await wait_idle(served)
        assert all_free(served)


async def test_cli_prints_each_completion() -> None:
    async with serve("tiny") as served:
        address = f"127.0.0.1:{served.plane.port}"
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "controlplane.cli", "generate", "Hi", "--address", address,
                             "--max-tokens", "4", "--ignore-eos", "--n", "2", "--temperature", "1.0", "--seed", "3"],
            capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--- completion 0" in out.stdout and "--- completion 1" in out.stdout
    assert out.stderr.count("finish_reason=length") == 2


async def test_completions_share_the_prompt_through_the_prefix_cache() -> None:
    """Completion 0 computes the prompt; the others join once it is cached (cached_tokens), or all
    start at once with the cache off. An Abort at any moment ends every completion."""
    prompt = {"token_ids": {"ids": list(range(3, 43))}, "ignore_eos": True, "temperature": 0.0}  # 40 tokens
    for caching in (True, False):
        async with serve("tiny", enable_prefix_caching=caching) as served:
            got = await choices(served, **prompt, max_tokens=5, n=3)
            cached = [got[i][1].cached_tokens for i in range(3)]
            assert cached == ([0, 32, 32] if caching else [0, 0, 0])
            assert got[0][0] == got[1][0] == got[2][0]  # greedy
            call = served.stub.Generate(pb.GenerateRequest(request_id="quick", n=3, **{**prompt, "max_tokens": 3000}))
            finals_task = asyncio.ensure_future(_finals(call))
            while not (await served.stub.Abort(pb.AbortRequest(request_id="quick"))).found:
                await asyncio.sleep(0.002)  # until the call reached the engine (maybe before the rest began)
            assert await finals_task == {0: "abort", 1: "abort", 2: "abort"}
            await wait_idle(served)
            assert all_free(served) and served.plane.engine.num_live_requests == 0


async def _finals(call) -> dict[int, str]:  # noqa: ANN001
    return {r.index: r.finish_reason async for r in call if r.finish_reason}


async def test_staggered_completions_join_though_the_queue_filled_meanwhile() -> None:
    """n completions are admitted together (all fit, or none starts); the ones that join once completion
    0's prompt is cached are not refused by a queue that other requests filled in between."""
    from tests.e2e.test_limits import all_blocks_free, slow_steps, wait_for

    shared = {"token_ids": {"ids": list(range(5, 25))}, "ignore_eos": True}  # a 16-token block and more
    async with serve("tiny", max_num_seqs=1, max_queued_requests=2) as served:
        slow_steps(served, 0.2)
        run = served.stub.Generate(pb.GenerateRequest(request_id="run", **LONG))
        await run.read()  # it holds the only sequence slot
        many = served.stub.Generate(pb.GenerateRequest(request_id="many", n=2, max_tokens=3, temperature=1.0,
                                                       **shared))
        await wait_for(lambda: served.scheduler.num_waiting == 1)
        w1 = served.stub.Generate(pb.GenerateRequest(request_id="w1", **LONG))
        await wait_for(lambda: served.scheduler.num_waiting == 2)
        run.cancel()
        await wait_for(lambda: any(s.request_id.startswith("many") for s in served.scheduler.running))
        w2 = served.stub.Generate(pb.GenerateRequest(request_id="w2", **LONG))  # the queue is full again
        await wait_for(lambda: served.scheduler.num_waiting == 2)
        await wait_for(lambda: served.plane.engine.has_request("many\x1f1"))  # joined behind w1 and w2
        w1.cancel()
        w2.cancel()
        finals = {}
        while (message := await many.read()) != grpc.aio.EOF:
            if message.finish_reason:
                finals[message.index] = (message.finish_reason, message.completion_tokens)
        assert finals == {0: ("length", 3), 1: ("length", 3)}
        await wait_for(lambda: all_blocks_free(served))
