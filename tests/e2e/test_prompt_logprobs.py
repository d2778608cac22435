"""prompt_logprobs through the gRPC API against transformers' logits on the same checkpoint: whole and
chunked prefill, the top alternatives, n > 1, a prompt the prefix cache holds (computed whole anyway),
and the messages after the first (none carry them)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from tokenizers import Tokenizer

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.dataplane.checkpoints import load_hf_model
from tests.e2e.conftest import Served, generate, serve


def hf_prompt_logprobs(model: object, prompt: list[int]) -> torch.Tensor:
    """[P - 1, V] log-softmax of the logits that predict prompt tokens 1..P-1."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()  # type: ignore[operator]
    return torch.log_softmax(logits[:-1], dim=-1)


async def first_messages(served: Served, **fields: object) -> dict[int, list[pb.GenerateResponse]]:
    messages: dict[int, list[pb.GenerateResponse]] = {}
    async for response in served.stub.Generate(pb.GenerateRequest(**fields)):
        messages.setdefault(response.index, []).append(response)
    return messages


def check(entries: list[pb.TokenLogprob], prompt: list[int], ref: torch.Tensor, top: int,
          folder: Path | None = None) -> None:
    assert [e.token_id for e in entries] == prompt[1:]
    if folder is not None:  # each token's text, as `tokenizers` decodes it alone (byte-level BPE: no space lost)
        oracle = Tokenizer.from_file(str(folder / "tokenizer.json"))
        texts = [(e.text, [(t.text, t.token_id) for t in e.top]) for e in entries]
        assert texts == [(oracle.decode([e.token_id], skip_special_tokens=False),
                          [(oracle.decode([t.token_id], skip_special_tokens=False), t.token_id) for t in e.top])
                         for e in entries]
        assert any(e.text for e in entries)
    for i, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(float(ref[i, prompt[i + 1]]), abs=2e-4), i
        chosen = float(ref[i, prompt[i + 1]])  # vLLM's rank: tokens at least as likely (near-ties either way)
        assert int((ref[i] > chosen + 1e-3).sum()) < entry.rank <= int((ref[i] >= chosen - 1e-3).sum()), i
        assert len(entry.top) == top
        if top:
            want = ref[i].topk(top)
            assert [t.token_id for t in entry.top] == want.indices.tolist()
            assert [t.logprob for t in entry.top] == pytest.approx(want.values.tolist(), abs=2e-4)


@pytest.mark.parametrize("budget", [2048, 8])  # whole, and in chunks of 8 tokens (one row of them each)
async def test_prompt_logprobs_match_transformers(budget: int, checkpoints: dict[str, Path]) -> None:
    folder = checkpoints["qwen3"]
    hf = load_hf_model(folder)
    prompt = torch.randint(3, 300, (37,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = hf_prompt_logprobs(hf, prompt)
    async with serve(str(folder), max_num_batched_tokens=budget, block_size=4) as served:
        got = await first_messages(served, token_ids={"ids": prompt}, max_tokens=4, temperature=0.0,
                                   ignore_eos=True, prompt_logprobs=3)
        first, *rest = got[0]
        check(list(first.prompt_logprobs), prompt, ref, top=3, folder=folder)
        assert not first.token_ids and rest[0].token_ids  # their own message, before the tokens
        assert all(not m.prompt_logprobs for m in rest)
        chosen_only = await first_messages(served, token_ids={"ids": prompt}, max_tokens=1, prompt_logprobs=0)
        check(list(chosen_only[0][0].prompt_logprobs), prompt, ref, top=0)
        assert chosen_only[0][-1].cached_tokens == 0  # the same prompt again: computed whole, not cached
        many = await first_messages(served, token_ids={"ids": prompt}, max_tokens=2, n=2, prompt_logprobs=1)
        for index in (0, 1):
            check(list(many[index][0].prompt_logprobs), prompt, ref, top=1)
        plain = await generate(served.stub, token_ids={"ids": prompt}, max_tokens=2)
        assert plain.final is not None and plain.final.cached_tokens > 0  # others still use the cache
        one = await first_messages(served, token_ids={"ids": prompt[:1]}, max_tokens=1, prompt_logprobs=2)
        assert not one[0][0].prompt_logprobs  # a one-token prompt has no token after its first
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, token_ids={"ids": prompt}, prompt_logprobs=21)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt_logprobs must be at most 20" in (err.value.details() or "")
        assert served.scheduler.allocator.num_free == served.scheduler.allocator.num_blocks


async def test_cli_scores_the_prompt(checkpoints: dict[str, Path]) -> None:
    import asyncio
    import math
    import re
    import subprocess
    import sys

    folder = checkpoints["qwen3"]
    prompt = [5, 9, 13, 17, 21, 25, 29]
    ref = hf_prompt_logprobs(load_hf_model(folder), prompt)
    total = sum(float(ref[i, prompt[i + 1]]) for i in range(len(prompt) - 1))
    async with serve(str(folder)) as served:
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "controlplane.cli", "generate", "--address",
                             f"127.0.0.1:{served.plane.port}", "--token-ids", ",".join(map(str, prompt)),
                             "--max-tokens", "1", "--prompt-logprobs", "0"],
            capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = re.search(r"prompt_logprobs: 6 tokens, sum (-?[0-9.]+), perplexity ([0-9.]+)", out.stderr)
    assert found, out.stderr
    assert float(found.group(1)) == pytest.approx(total, abs=1e-3)
    assert float(found.group(2)) == pytest.approx(math.exp(-total / 6), rel=1e-3)


async def test_a_long_prompts_logprobs_are_split_over_messages(checkpoints: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import controlplane.responses

    monkeypatch.setattr(controlplane.responses, "PROMPT_LOGPROBS_PER_MESSAGE", 10)  # the servicer runs in-process
    folder = checkpoints["qwen3"]
    prompt = torch.randint(3, 300, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf_prompt_logprobs(load_hf_model(folder), prompt)
    async with serve(str(folder)) as served:
        messages = (await first_messages(served, token_ids={"ids": prompt}, max_tokens=3, prompt_logprobs=1,
                                         ignore_eos=True))[0]
    sizes = [len(m.prompt_logprobs) for m in messages]
    assert sizes[:4] == [10, 10, 10, 6] and not any(sizes[4:]), sizes
    assert all(not m.token_ids for m in messages[:4]) and sum(len(m.token_ids) for m in messages) == 3
    check([e for m in messages for e in m.prompt_logprobs], prompt, ref, top=1)
