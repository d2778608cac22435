"""What the GPU tests share: the workers they build, prompts, a greedy driver, the test checkpoint and
random paged batches. Importing it on a machine without CUDA is harmless (the tests skip).

DUETSERVE_TEST_BLOCK_SIZE (default: the data plane's) sets the KV page size of every worker and of the
random attention batches, DUETSERVE_TEST_CUDA_CORE_MAX_BATCH flashinfer_backend's largest decode batch
on the CUDA-core kernel and DUETSERVE_TEST_UNSPLIT_KV_MIN_BATCH its smallest decode graph that reads KV
unsplit, and DUETSERVE_TEST_EPILOGUE_NORM_ROWS the workers' `epilogue_norm_rows` where a test does not set
it, so the suite can vouch for another setting before it becomes the default."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dataplane.attention.base import AttentionBatch
from dataplane.worker import load_worker
from shared.config import DataplaneConfig
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan

BS = int(os.environ.get("DUETSERVE_TEST_BLOCK_SIZE", DataplaneConfig().block_size))
EPILOGUE_ROWS = int(os.environ.get("DUETSERVE_TEST_EPILOGUE_NORM_ROWS") or DataplaneConfig().epilogue_norm_rows)
for _name in ("CUDA_CORE_MAX_BATCH", "UNSPLIT_KV_MIN_BATCH"):  # before any worker builds its wrappers or graphs
    if os.environ.get(f"DUETSERVE_TEST_{_name}"):
        import dataplane.attention.flashinfer_backend as _fib

        setattr(_fib, _name, int(os.environ[f"DUETSERVE_TEST_{_name}"]))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def random_batch(query_lens: list[int], context_lens: list[int], num_blocks: int, gen: torch.Generator) -> AttentionBatch:
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for q, c in zip(query_lens, context_lens):
        n = -(-(q + c) // BS)
        tables.append(perm[used : used + n])
        used += n
    return AttentionBatch(query_lens, context_lens, tables, BS)


def gpu_worker(tmp_model: str, **overrides: object):  # noqa: ANN202
    overrides.setdefault("multiplexing", False)  # partitions (and their calibration) only where a test needs them
    overrides.setdefault("max_num_seqs", 32)
    overrides.setdefault("max_num_batched_tokens", 1024)
    overrides.setdefault("block_size", BS)
    overrides.setdefault("epilogue_norm_rows", EPILOGUE_ROWS)
    config = DataplaneConfig(model=tmp_model, device="cuda", num_kv_blocks=512, **overrides)  # type: ignore[arg-type]
    return load_worker(config)


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(5, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def greedy_run(runner, prompts: list[list[int]], new_tokens: int, sync_debug: bool = False,  # noqa: ANN001
               depth: int = 1) -> list[list[int]]:
    """Drive a runner like the control plane does: prefill each prompt whole, then decode all together.

    `depth` 2 launches step i+1 before collecting step i (async scheduling: inputs fed on the device)."""
    blocks_per_seq = -(-(max(map(len, prompts)) + new_tokens) // BS)
    news = [NewRequest(seq_id=i, token_ids=p, num_prompt_tokens=len(p),
                       block_ids=list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
                       sampling=SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
    out: list[list[int]] = [[] for _ in prompts]
    plans = [StepPlan(step_id=0, new_requests=news,
                      scheduled=[ScheduledSeq(seq_id=i, num_tokens=len(p)) for i, p in enumerate(prompts)])]
    plans += [StepPlan(step_id=s, scheduled=[ScheduledSeq(seq_id=i, num_tokens=1) for i in range(len(prompts))])
              for s in range(1, new_tokens)]
    if sync_debug:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        def collect(pending) -> None:  # noqa: ANN001
            while not pending.ready():
                pass
            for o in pending.result().outputs:
                out[o.seq_id].extend(o.token_ids)

        launched = []
        for plan in plans:
            launched.append(runner.launch(plan))
            if len(launched) >= depth:
                collect(launched.pop(0))
        for pending in launched:
            collect(pending)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out


def save_qwen3(folder: Path, norms: bool = False) -> Path:
    """A small Qwen3 checkpoint with flashinfer-friendly head_dim 128; `norms`: RMSNorm weights drawn
    around 1 (a fresh model's are all ones, which a fold of them into the projections would not change)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=2048,
                      initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    if norms:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1 + 0.3 * torch.randn(param.shape))
    model.save_pretrained(folder)
    return folder
