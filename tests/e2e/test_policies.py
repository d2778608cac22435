"""Every policy gives the same greedy tokens on the real tiny model: through gRPC (where the CPU worker
cannot multiplex, so static/duet run aggregated), and in-process with multiplexed look-ahead plans
executed by the real ModelRunner."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import torch

from controlplane.kv_blocks import BlockAllocator
from controlplane.scheduler import Scheduler
from controlplane.sequence import Sequence, StopParams
from dataplane.worker import load_worker
from shared.config import DataplaneConfig, SchedulerConfig
from shared.messages import SamplingParams
from tests.e2e.conftest import generate, serve

LENGTHS = ((5, 20), (40, 12), (90, 16), (3, 24), (61, 9))


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n, _ in LENGTHS]


async def run_policy(folder: Path, policy: str) -> list[list[int]]:
    async with serve(str(folder), max_num_batched_tokens=32, policy=policy) as served:
        calls = [generate(served.stub, token_ids={"ids": p}, max_tokens=out, temperature=0.0, ignore_eos=True)
                 for p, (_, out) in zip(prompts(), LENGTHS)]
        done = await asyncio.gather(*calls)
        sched = served.scheduler
        assert sched.allocator.num_free == sched.allocator.num_blocks
        assert sched.predictor is not None and sched.predictor.report().count > 0  # the CPU profile arrived
        return [c.token_ids for c in done]


async def test_policies_give_identical_greedy_tokens_over_grpc(checkpoints: dict[str, Path]) -> None:
    folder = checkpoints["qwen3"]
    reference = await run_policy(folder, "aggregated")
    assert [len(t) for t in reference] == [out for _, out in LENGTHS]
    for policy in ("prefill-first", "duet"):
        assert await run_policy(folder, policy) == reference, policy


def run_in_process(folder: Path, policy: str, multiplex: bool) -> tuple[list[list[int]], dict[str, int]]:
    loaded = load_worker(DataplaneConfig(model=str(folder), device="cpu", num_kv_blocks=96, block_size=4))
    ready = loaded.ready
    if multiplex:  # pretend the worker can split SMs; the CPU runner runs look-ahead steps sequentially
        ready = msgspec.structs.replace(ready, supports_multiplexing=True, partition_sm_counts=[8, 16],
                                        device=msgspec.structs.replace(ready.device, sm_count=32))
    config = SchedulerConfig(policy=policy, max_num_seqs=24, max_num_batched_tokens=24,  # type: ignore[arg-type]
                             static_decode_sms=8, static_lookahead=5)
    sched = Scheduler(config, BlockAllocator(ready.num_kv_blocks, ready.block_size), 4096, frozenset(), ready)
    seqs = [Sequence(seq_id=i, request_id=str(i), prompt_token_ids=p, sampling=SamplingParams(temperature=0.0),
                     stop=StopParams(max_tokens=out, ignore_eos=True), arrival_time=0.0)
            for i, (p, (_, out)) in enumerate(zip(prompts(), LENGTHS))]
    for seq in seqs[:3]:
        sched.add(seq)
    steps = 0
    while sched.has_work():
        plan = sched.schedule()
        assert plan is not None
        sched.update(loaded.runner.execute(plan))
        sched.check_invariants()
        steps += 1
        if steps == 4:  # late arrivals: prefill alongside running decodes
            sched.add(seqs[3])
            sched.add(seqs[4])
    assert sched.allocator.num_free == sched.allocator.num_blocks
    return [s.output_token_ids for s in seqs], dict(sched.stats.steps)


def test_multiplexed_lookahead_plans_on_the_real_runner_match_aggregated(checkpoints: dict[str, Path]) -> None:
    folder = checkpoints["qwen3"]
    reference, _ = run_in_process(folder, "aggregated", multiplex=False)
    tokens, steps = run_in_process(folder, "static", multiplex=True)
    assert steps.get("multiplexed", 0) > 0
    assert tokens == reference
