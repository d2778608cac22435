"""DenseForCausalLM on the torch paged backend matches transformers' logits on tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dataplane.models.loader import load_model, resolve_dtype
from tests.dataplane.checkpoints import TINY_VOCAB, load_hf_model, write_tiny_checkpoint
from tests.dataplane.paged_driver import PagedDriver

CPU = torch.device("cpu")
LENGTHS = (6, 11, 40)


def _seqs(seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY_VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


def _hf_logits(folder: Path, seqs: list[list[int]]) -> list[torch.Tensor]:
    hf = load_hf_model(folder)
    with torch.no_grad():
        return [hf(torch.tensor([s])).logits[0].float() for s in seqs]


def _paged_logits(folder: Path, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Step 1: seq0 minus its last token, seq1 whole, seq2's first 25. Step 2: the rest."""
    model, _ = load_model(str(folder), dtype=torch.float32, device=CPU)
    driver = PagedDriver(model, seqs, block_size=4)
    a0, a1, a2 = driver.step([(0, 5), (1, 11), (2, 25)])
    b2, b0 = driver.step([(2, 15), (0, 1)])  # chunked prefill with context + a decode
    return [torch.cat([a0, b0]), a1, torch.cat([a2, b2])]


@pytest.mark.parametrize(
    ("arch", "tied", "shards", "bias"),
    [
        ("qwen3", False, 1, False),
        ("llama", False, 1, False),
        ("qwen3", True, 1, False),
        ("llama", True, 3, False),
        ("qwen3", False, 2, True),
    ],
    ids=["qwen3", "llama3-rope", "qwen3-tied", "llama-tied-sharded", "qwen3-bias-sharded"],
)
def test_logits_match_transformers(tmp_path: Path, arch: str, tied: bool, shards: int,
                                   bias: bool) -> None:
    folder = write_tiny_checkpoint(tmp_path / arch, arch, tied=tied, shards=shards,  # type: ignore[arg-type]
                                   attention_bias=bias)
    seqs = _seqs()
    ref = _hf_logits(folder, seqs)
    got = _paged_logits(folder, seqs)
    assert ref[0].abs().max() > 1.0  # logits are not trivially small
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
        assert torch.equal(g.argmax(-1), r.argmax(-1))


def test_bfloat16_load_runs(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "q", "qwen3")
    model, cfg = load_model(str(folder), dtype=torch.bfloat16, device=CPU)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    seqs = _seqs()
    driver = PagedDriver(model, seqs)
    out = driver.step([(0, 6), (1, 3)])
    assert out[0].dtype == torch.float32 and torch.isfinite(out[0]).all()
    ref = _hf_logits(folder, seqs)[0]
    agree = (out[0].argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.5


def _rewrite(folder: Path, edit: str) -> None:
    tensors = load_file(folder / "model.safetensors")
    if edit == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif edit == "unexpected":
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    elif edit == "shape":
        tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit", ["missing", "unexpected", "shape"])
def test_checkpoint_mismatch_is_a_clear_error(tmp_path: Path, edit: str) -> None:
    folder = write_tiny_checkpoint(tmp_path / "q", "qwen3")
    _rewrite(folder, edit)
    word = {"missing": "missing", "unexpected": "unexpected", "shape": "shape"}[edit]
    with pytest.raises(ValueError, match=word):
        load_model(str(folder), dtype=torch.float32, device=CPU)


def test_untied_checkpoint_without_lm_head_fails(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "q", "qwen3", tied=False)
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(str(folder), dtype=torch.float32, device=CPU)


def test_tied_checkpoint_shares_storage(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "l", "llama", tied=True)
    model, cfg = load_model(str(folder), dtype=torch.float32, device=CPU)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("lm_head_last", [False, True])
def test_a_tied_checkpoints_own_lm_head_is_ignored_as_in_vllm(tmp_path: Path, lm_head_last: bool) -> None:
    """Tied config, both tensors stored and different: the embedding serves both whatever the file
    order (a later shard's lm_head.weight used to overwrite the embedding)."""
    folder = write_tiny_checkpoint(tmp_path / "l", "llama", tied=True)
    tensors = load_file(folder / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    lm_head = torch.randn_like(embed)
    (folder / "model.safetensors").unlink()
    first, second = ({k: v for k, v in tensors.items() if k != "lm_head.weight"}, {"lm_head.weight": lm_head})
    if not lm_head_last:
        first, second = second, first
    weight_map = {}
    for i, part in enumerate((first, second), 1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _ = load_model(str(folder), dtype=torch.float32, device=CPU)
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, embed)


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "q", "qwen3", shards=2)
    shards = sorted(folder.glob("model-*.safetensors"))
    first = load_file(shards[0])
    second = load_file(shards[1])
    key = next(iter(first))
    second[key] = first[key]
    save_file(second, shards[1], metadata={"format": "pt"})
    with pytest.raises(ValueError, match="more than one file"):
        load_model(str(folder), dtype=torch.float32, device=CPU)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="neither a preset"):
        load_model("no-such-model", dtype=torch.float32, device=CPU)


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("int3", "cpu")
