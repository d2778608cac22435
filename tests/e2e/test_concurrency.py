"""Concurrent streams give the same tokens as each request alone, under preemption too,
and every KV block is free again once the server is idle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import Completion, generate, serve

NUM_STREAMS = 32


def workload(seed: int) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(NUM_STREAMS):
        length = int(torch.randint(1, 80, (1,), generator=g))
        prompt = torch.randint(3, 300, (length,), generator=g).tolist()
        fields: dict[str, object] = {
            "request_id": f"r{i}", "token_ids": {"ids": prompt},
            "max_tokens": int(torch.randint(4, 40, (1,), generator=g)), "ignore_eos": True,
        }
        if i % 3 == 0:  # seeded sampling must be reproducible under batching too
            fields.update(temperature=0.8, top_p=0.9, seed=1000 + i)
        else:
            fields.update(temperature=0.0)
        requests.append(fields)
    return requests


async def run_all(served: object, requests: list[dict[str, object]]) -> list[Completion]:
    return await asyncio.gather(*(generate(served.stub, **r) for r in requests))  # type: ignore[attr-defined]


@pytest.mark.parametrize("num_kv_blocks", [512, 24], ids=["roomy-kv", "preempting-kv"])
async def test_concurrent_equals_alone(num_kv_blocks: int, checkpoints: dict[str, Path]) -> None:
    requests = workload(seed=7)
    async with serve(str(checkpoints["qwen3"]), num_kv_blocks=512, max_num_batched_tokens=64) as served:
        alone = [await generate(served.stub, **r) for r in requests]
    async with serve(
        str(checkpoints["qwen3"]), num_kv_blocks=num_kv_blocks, max_num_batched_tokens=64
    ) as served:
        together = await run_all(served, requests)
        scheduler = served.scheduler
        assert scheduler.num_running == 0 and scheduler.num_waiting == 0
        assert scheduler.allocator.num_free == scheduler.allocator.num_blocks
        scheduler.check_invariants()
        if num_kv_blocks < 100:
            assert scheduler.num_preemptions > 0, "the small KV cache should have forced preemption"
    for request, a, b in zip(requests, alone, together):
        assert b.token_ids == a.token_ids, f"{request['request_id']} differs when batched"
        assert b.final is not None and b.final.finish_reason == "length"
        assert len(b.token_ids) == request["max_tokens"]



async def test_a_stream_that_falls_behind_gets_one_merged_delta() -> None:
    """While a request's stream takes nothing (its servicer busy sending, or slow), the engine's
    deltas merge into one (logprobs and text included); the tokens equal a brisk reader's."""
    from controlplane.engine import EngineRequest
    from controlplane.sequence import StopParams
    from shared.messages import SamplingParams

    fields = {"token_ids": {"ids": [5, 6, 7]}, "max_tokens": 60, "ignore_eos": True, "temperature": 0.0,
              "logprobs": 1}
    async with serve("tiny") as served:
        brisk = await generate(served.stub, **fields)
        engine = served.plane.engine
        handle = engine.add_request(EngineRequest("slow", [5, 6, 7], SamplingParams(temperature=0.0, logprobs=1),
                                                  StopParams(max_tokens=60, ignore_eos=True)))
        await asyncio.sleep(0.5)  # the engine goes on; nothing is taken
        deltas = [delta async for delta in handle]
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == brisk.token_ids and len(tokens) == 60
    assert len(deltas) < brisk.messages and len(deltas[0].token_ids) > 1
    assert all(len(d.logprobs or []) == len(d.token_ids) for d in deltas)
    assert "".join(d.text for d in deltas) == brisk.text
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 60
    assert handle.queue.merges == 60 - len(deltas)


async def test_stream_interval_batches_tokens_into_fewer_messages() -> None:
    fields = {"token_ids": {"ids": [5, 6, 7]}, "max_tokens": 21, "ignore_eos": True, "temperature": 0.0}
    async with serve("tiny") as served:
        every = await generate(served.stub, **fields)
    async with serve("tiny", stream_interval=4) as served:
        batched = await generate(served.stub, **fields)
    assert batched.token_ids == every.token_ids and batched.text == every.text
    assert batched.messages <= 1 + 5 + 1 < every.messages  # the first token, then >= 4 a message
