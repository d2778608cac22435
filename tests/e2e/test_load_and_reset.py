"""GetLoad and ResetPrefixCache through the gRPC API: the load follows requests as they run and
wait, and a reset makes the next identical prompt miss the cache (and refuses without caching)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import generate, serve

PROMPT = {"ids": list(range(10, 50))}  # 40 tokens: two full blocks of 16


async def _load_until(stub, ready, timeout_s: float = 20.0) -> pb.Load:  # noqa: ANN001
    """Poll GetLoad until `ready(load)` holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        load = await stub.GetLoad(pb.GetLoadRequest())
        if ready(load) or asyncio.get_running_loop().time() > deadline:
            return load
        await asyncio.sleep(0.01)


async def test_load_follows_running_and_waiting_requests() -> None:
    async with serve("tiny", max_num_seqs=1, num_kv_blocks=64) as served:
        idle = await served.stub.GetLoad(pb.GetLoadRequest())
        assert (idle.num_requests_running, idle.num_requests_waiting, idle.num_waiting_tokens) == (0, 0, 0)
        assert (idle.num_kv_blocks, idle.num_kv_blocks_used, idle.kv_cache_usage) == (64, 0, 0.0)
        first = served.stub.Generate(pb.GenerateRequest(token_ids=PROMPT, max_tokens=1000, ignore_eos=True))
        await first.read()
        second = served.stub.Generate(pb.GenerateRequest(token_ids={"ids": [5] * 21}, max_tokens=4))
        busy = await _load_until(served.stub, lambda load: load.num_requests_waiting == 1)
        assert (busy.num_requests_running, busy.num_requests_waiting, busy.num_waiting_tokens) == (1, 1, 21)
        assert busy.num_kv_blocks_used >= 3 and busy.kv_cache_usage == busy.num_kv_blocks_used / 64
        first.cancel()
        async for _ in second:  # admitted once the first is gone
            pass
        after = await _load_until(served.stub, lambda load: load.num_requests_running == 0)
        assert (after.num_requests_running, after.num_requests_waiting, after.num_kv_blocks_used) == (0, 0, 0)
        assert after.num_kv_blocks_cached >= 3  # full blocks stay in the prefix cache, counted free


async def test_reset_prefix_cache_makes_the_next_prompt_miss() -> None:
    async with serve("tiny") as served:
        cold = await generate(served.stub, token_ids=PROMPT, max_tokens=2, temperature=0.0)
        warm = await generate(served.stub, token_ids=PROMPT, max_tokens=2, temperature=0.0)
        assert cold.final is not None and warm.final is not None
        assert (cold.final.cached_tokens, warm.final.cached_tokens) == (0, 32)
        cached = (await served.stub.GetLoad(pb.GetLoadRequest())).num_kv_blocks_cached
        reset = await served.stub.ResetPrefixCache(pb.ResetPrefixCacheRequest())
        assert reset.blocks_dropped == cached >= 2
        assert (await served.stub.GetLoad(pb.GetLoadRequest())).num_kv_blocks_cached == 0
        again = await generate(served.stub, token_ids=PROMPT, max_tokens=2, temperature=0.0)
        assert again.final is not None and again.final.cached_tokens == 0
        assert again.token_ids == cold.token_ids  # recomputed, the same greedy tokens
        # a reset while a request runs: it keeps its blocks and finishes; its prefix is not found later
        running = served.stub.Generate(pb.GenerateRequest(token_ids={"ids": list(range(60, 100))}, max_tokens=30,
                                                          ignore_eos=True))
        await running.read()
        await served.stub.ResetPrefixCache(pb.ResetPrefixCacheRequest())
        finals = []
        while (message := await running.read()) != grpc.aio.EOF:
            finals += [message] if message.finish_reason else []
        assert [m.finish_reason for m in finals] == ["length"]
        late = await generate(served.stub, token_ids={"ids": list(range(60, 100))}, max_tokens=2)
        assert late.final is not None and late.final.cached_tokens == 0


async def test_reset_without_prefix_caching_is_failed_precondition() -> None:
    async with serve("tiny", enable_prefix_caching=False) as served:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.stub.ResetPrefixCache(pb.ResetPrefixCacheRequest())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "prefix caching is off" in (err.value.details() or "")
        load = await served.stub.GetLoad(pb.GetLoadRequest())
        assert load.num_kv_blocks_cached == 0 and load.num_kv_blocks == 512


async def _cli(*argv: str) -> tuple[int, str, str]:
    import sys

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "controlplane.cli", *argv,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_load_and_reset_commands() -> None:
    import json

    async with serve("tiny", num_kv_blocks=64) as served:
        await generate(served.stub, token_ids=PROMPT, max_tokens=2, temperature=0.0)
        address = f"127.0.0.1:{served.plane.port}"
        code, out, _ = await _cli("load", "--address", address)
        load = json.loads(out)
        assert code == 0 and load["num_kv_blocks"] == 64 and load["num_requests_running"] == 0
        assert load["num_kv_blocks_cached"] >= 2
        assert all(isinstance(value, (int, float)) for value in load.values()), load  # no 64-bit int as a string
        assert set(load) == {field.name for field in pb.Load.DESCRIPTOR.fields}
        code, out, _ = await _cli("reset-prefix-cache", "--address", address)
        assert code == 0 and f"{load['num_kv_blocks_cached']} blocks dropped" in out
    async with serve("tiny", enable_prefix_caching=False) as served:
        code, _, err = await _cli("reset-prefix-cache", "--address", f"127.0.0.1:{served.plane.port}")
        assert code == 1 and "FAILED_PRECONDITION" in err
