"""Greedy tokens through the real gRPC API equal transformers' greedy generate (tiny checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dataplane.checkpoints import load_hf_model
from tests.e2e.conftest import generate, serve

NEW_TOKENS = 32
CHUNK = 32  # token budget per step: prompts longer than this are prefilled in several chunks
PROMPT_LENGTHS = (1, 7, 33, 90)


def hf_greedy(model: object, prompt: list[int], new_tokens: int, stop_at_eos: bool) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        eos_token_id=model.config.eos_token_id if stop_at_eos else None,  # type: ignore[attr-defined]
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)  # type: ignore[attr-defined]
    generated = out[0, len(prompt):].tolist()
    if stop_at_eos and model.config.eos_token_id in generated:  # type: ignore[attr-defined]
        generated = generated[: generated.index(model.config.eos_token_id) + 1]  # type: ignore[attr-defined]
    return generated


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("arch,async_scheduling", [("qwen3", True), ("llama", True), ("qwen3", False)])
async def test_greedy_matches_transformers(arch: str, async_scheduling: bool, checkpoints: dict[str, Path]) -> None:
    """With async scheduling (the default: step i+1 planned while step i runs) and without."""
    folder = checkpoints[arch]
    hf = load_hf_model(folder)
    async with serve(str(folder), max_num_batched_tokens=CHUNK, async_scheduling=async_scheduling) as served:
        for prompt in prompts(seed=1):
            expected = hf_greedy(hf, prompt, NEW_TOKENS, stop_at_eos=False)
            got = await generate(
                served.stub, token_ids={"ids": prompt}, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True
            )
            assert got.token_ids == expected, f"prompt of {len(prompt)} tokens diverged"
            assert got.final is not None and got.final.finish_reason == "length"
            assert got.final.completion_tokens == NEW_TOKENS and got.final.prompt_tokens == len(prompt)
        assert served.scheduler.allocator.num_free == served.scheduler.allocator.num_blocks


async def test_text_prompt_and_eos_match_transformers(checkpoints: dict[str, Path]) -> None:
    """A text prompt goes through tokenizer.json; stopping at EOS matches transformers too."""
    from tokenizers import Tokenizer

    folder = checkpoints["qwen3"]
    hf = load_hf_model(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "The quick brown fox jumps over the lazy dog."
    prompt = tokenizer.encode(text).ids
    expected = hf_greedy(hf, prompt, 64, stop_at_eos=True)
    async with serve(str(folder), max_num_batched_tokens=CHUNK) as served:
        got = await generate(served.stub, text=text, max_tokens=64, temperature=0.0)
    assert got.token_ids == expected
    assert got.final is not None and got.final.prompt_tokens == len(prompt)
    assert got.text == tokenizer.decode(expected, skip_special_tokens=True)
    reason = "stop" if expected and expected[-1] == hf.config.eos_token_id else "length"
    assert got.final.finish_reason == reason


async def test_prefix_cache_hits_keep_transformers_tokens(checkpoints: dict[str, Path]) -> None:
    """Prompts that start with earlier prompts (and their answers) reuse the cached blocks -- the
    final message says how many prompt tokens -- and still give transformers' greedy tokens; with
    the cache off nothing is reused."""
    folder = checkpoints["qwen3"]
    hf = load_hf_model(folder)
    base = prompts(seed=3)[3]  # 90 tokens: 5 full blocks of 16
    for caching in (True, False):
        async with serve(str(folder), max_num_batched_tokens=CHUNK, enable_prefix_caching=caching) as served:
            first = await generate(served.stub, token_ids={"ids": base}, max_tokens=NEW_TOKENS, temperature=0.0,
                                   ignore_eos=True)
            # the same prompt; a longer one; the next turn of a conversation (prompt, answer, more)
            turn = base + first.token_ids + [5, 6, 7]
            cases = [(base, 80), (base + [9] * 20, 80), (turn, 112)]
            for prompt, hit in cases:
                got = await generate(served.stub, token_ids={"ids": prompt}, max_tokens=NEW_TOKENS,
                                     temperature=0.0, ignore_eos=True)
                assert got.token_ids == hf_greedy(hf, prompt, NEW_TOKENS, stop_at_eos=False), len(prompt)
                assert got.final is not None and got.final.cached_tokens == (hit if caching else 0), len(prompt)
            assert first.final is not None and first.final.cached_tokens == 0
            served.scheduler.check_invariants()
            assert served.scheduler.allocator.num_free == served.scheduler.allocator.num_blocks
