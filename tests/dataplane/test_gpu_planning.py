"""GPU tests (marker `gpu`) of planning while the GPU is behind: a step's host work (flashinfer plans,
input staging, graph re-plans) must return without waiting for the GPU, which
`torch.cuda.set_sync_debug_mode` cannot see (a copy from pageable host memory may wait for the stream
without any call it flags), and a plan made before the GPU copied an earlier one must not overwrite it.
Skipped without CUDA."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dataplane.attention.base import AttentionShape
from dataplane.attention.torch_paged import TorchPagedAttention
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan
from tests.dataplane.gpu_support import BS, gpu_worker, random_batch, random_prompts, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BEHIND_CYCLES = int(3e8)  # torch.cuda._sleep: ~0.15-0.2 s of GPU time queued ahead of the host


def wait_for_gpu(timeout_s: float = 60.0) -> None:
    """Wait for the work queued so far by polling an event, failing past `timeout_s`: a kernel that
    runs with another step's plan may never end (with the plan pool bypassed, the plan-race test never
    finished, and no test timeout interrupts a blocking `torch.cuda.synchronize`). The runaway kernel
    stays queued, so a later GPU test in the same process would wait on it too: run with `-x`."""
    done = torch.cuda.Event()
    done.record()
    deadline = time.monotonic() + timeout_s
    while not done.query():
        if time.monotonic() > deadline:
            pytest.fail(f"the GPU did not finish within {timeout_s:.0f} s: a kernel ran with a plan not its own")
        time.sleep(0.001)


def returns_while_behind(fn: Callable[[], object]) -> bool:
    """Run `fn` with ~0.15 s of GPU work queued ahead of it; whether it returned before the GPU got
    through that work (False: something in it waited for the GPU)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(BEHIND_CYCLES)
    behind = torch.cuda.Event()
    behind.record()
    fn()
    returned_first = not behind.query()
    wait_for_gpu()
    return returned_first


def _shape() -> AttentionShape:
    return AttentionShape(num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["decode-cuda-cores", "decode-tensor-cores", "mixed", "split"])
def test_planning_an_eager_step_does_not_wait_for_the_gpu(kind: str) -> None:
    from dataplane.attention import flashinfer_backend as fib

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    blocks = 25_000 // BS + 64  # every page the longest batch below needs, at any page size
    if kind == "decode-cuda-cores":
        batch = random_batch([1] * 4, [100, 900, 40, 3000], blocks, gen)
    elif kind == "decode-tensor-cores":
        batch = random_batch([1] * 40, [500] * 40, blocks, gen)
    elif kind == "mixed":
        batch = random_batch([1, 1, 300, 7], [300, 17, 0, 1000], blocks, gen)
    else:  # leading decodes on the decode kernel, the chunks after on the prefill kernel
        batch = random_batch([1] * 40 + [150], [60] * 40 + [0], blocks, gen)
    if kind.startswith("decode") and fib.uses_cuda_cores(batch.num_seqs) != (kind == "decode-cuda-cores"):
        pytest.skip(f"{batch.num_seqs} decode rows take the other kernel with these settings (CUDA_CORE_MAX_BATCH)")
    fi = fib.FlashInferAttention(_shape(), dev)
    slots = batch.slot_mapping(dev)  # staged ahead, as the runner does: only the plan is timed
    fi.begin_step(batch, dev, slots)  # first plan: builds the wrappers, loads the kernels
    assert returns_while_behind(lambda: fi.begin_step(batch, dev, slots)), f"planning a {kind} step waited for the GPU"


def test_replanning_while_the_gpu_is_behind_keeps_each_plan() -> None:
    """flashinfer stages a plan in pinned host memory and copies it to the device later, in stream
    order. Plan a step while the GPU is behind, then plan another before the GPU reached the first
    copy (look-ahead passes, async scheduling): the first step must still attend over its own batch.
    The test checks that the second plan was made while the GPU was still behind; without that window
    it could not fail. With the plan pool bypassed (gpu_suite.sh planning-nopool) the first step's
    kernel, run with the second plan, never ended (H100, 2026-12-07): `wait_for_gpu` fails it."""
    from dataplane.attention.flashinfer_backend import FlashInferAttention

    dev, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    long = random_batch([1] * 2, [8000] * 2, 2000, gen)  # few rows, long KV: split into many chunks
    short = random_batch([1] * 2, [5] * 2, 2000, gen)  # not split: another schedule
    if BS * 2000 < 2 * 8001 + 2 * 6:
        pytest.skip(f"pages of {BS} tokens: 2000 blocks cannot hold both batches")
    q, k, v = (torch.randn(2, h, 128, device=dev, dtype=dtype) for h in (32, 8, 8))
    base = torch.randn(2000, 2, BS, 8, 128, device=dev, dtype=dtype)
    caches = [base.clone(), torch.randn_like(base)]
    fi = FlashInferAttention(_shape(), dev)
    slots = {id(b): b.slot_mapping(dev) for b in (long, short)}  # staged ahead, as the runner does
    fi.begin_step(short, dev, slots[id(short)])  # builds the wrapper now: pinned memory may wait for the GPU
    fi.forward(0, q, k, v, caches[1])
    out: list[torch.Tensor] = []

    def plan_twice() -> None:
        fi.begin_step(long, dev, slots[id(long)])
        out.append(fi.forward(0, q, k, v, caches[0]))
        fi.begin_step(short, dev, slots[id(short)])  # planned before the GPU copied the first plan
        fi.forward(0, q, k, v, caches[1])

    assert returns_while_behind(plan_twice), "planning waited for the GPU: the race this test guards never ran"
    ref = TorchPagedAttention()
    ref.begin_step(long, dev)
    expected = ref.forward(0, q.float(), k.float(), v.float(), base.float())
    assert rel_err(out[0], expected) < 1e-2


def test_launching_steps_does_not_wait_for_the_gpu(gpu_checkpoint: Path) -> None:
    """The runner's whole launch (input staging, plans, graph replay, sampling, the result copies) of a
    decode step, a look-ahead decode step and a mixed step returns while the GPU is still behind."""
    runner = gpu_worker(str(gpu_checkpoint)).runner
    prompts = random_prompts(7, 512, seed=5)
    per_seq = -(-(max(map(len, prompts)) + 32) // BS)
    news = [NewRequest(seq_id=i, token_ids=p, num_prompt_tokens=len(p),
                       block_ids=list(range(i * per_seq, (i + 1) * per_seq)),
                       sampling=SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
    decoding = range(6)

    def decode(step: int, steps: int = 1) -> StepPlan:
        return StepPlan(step_id=step, decode_steps=steps,
                        scheduled=[ScheduledSeq(seq_id=i, num_tokens=1) for i in decoding])

    runner.launch(StepPlan(step_id=0, new_requests=news[:6],
                           scheduled=[ScheduledSeq(seq_id=i, num_tokens=len(prompts[i])) for i in decoding])).wait()
    for step in (1, 2):  # the decode graph's bucket captured, every kernel loaded
        runner.launch(decode(step)).wait()
    runner.launch(decode(3, steps=2)).wait()
    pending = []
    assert returns_while_behind(lambda: pending.append(runner.launch(decode(4)))), "a decode step waited"
    pending.pop().wait()
    assert returns_while_behind(lambda: pending.append(runner.launch(decode(5, steps=2)))), "a look-ahead step waited"
    pending.pop().wait()
    mixed = StepPlan(step_id=6, new_requests=[news[6]],
                     scheduled=[*decode(6).scheduled, ScheduledSeq(seq_id=6, num_tokens=len(prompts[6]))])
    assert returns_while_behind(lambda: pending.append(runner.launch(mixed))), "a mixed step waited"
    pending.pop().wait()
