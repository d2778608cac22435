"""Test helpers: write tiny random Hugging Face checkpoints (Qwen3 / Llama-3) with transformers.

Used as the reference in data-plane tests and importable by other tests
(`from tests.dataplane.checkpoints import write_tiny_checkpoint`). Test-only: dataplane code must
never import this module or transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

TINY_VOCAB = 300
TINY_EOS = 2
TINY_BOS = 1


def tiny_hf_config(arch: Literal["qwen3", "llama"], tied: bool = False,
                   attention_bias: bool = False) -> Any:
    """A small transformers config; Llama gets llama3 RoPE scaling that matters at short lengths."""
    from transformers import LlamaConfig, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        max_position_embeddings=512, tie_word_embeddings=tied, attention_bias=attention_bias,
        initializer_range=0.1, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS,
    )
    if arch == "qwen3":
        return Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return LlamaConfig(rope_parameters=rope, **common)
    raise ValueError(f"unknown arch {arch!r}")


def make_hf_model(arch: Literal["qwen3", "llama"], tied: bool = False, attention_bias: bool = False,
                  seed: int = 0) -> Any:
    """A float32 transformers model with seeded random weights (eager attention, eval mode)."""
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    cfg = tiny_hf_config(arch, tied=tied, attention_bias=attention_bias)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = Qwen3ForCausalLM if arch == "qwen3" else LlamaForCausalLM
    model = cls(cfg).float().eval()
    if attention_bias:  # biases start at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    return model


def write_tiny_checkpoint(path: str | Path, arch: Literal["qwen3", "llama"] = "qwen3",
                          tied: bool = False, shards: int = 1, attention_bias: bool = False,
                          seed: int = 0) -> Path:
    """Save a tiny random checkpoint folder (config.json + safetensors) under `path`; return it.

    `shards > 1` splits the weights into about that many `model-0000X-of-0000N.safetensors`
    files with an index.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = make_hf_model(arch, tied=tied, attention_bias=attention_bias, seed=seed)
    kwargs: dict[str, Any] = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        kwargs["max_shard_size"] = max(total // shards, 1)
    model.save_pretrained(path, **kwargs)
    return path


def load_hf_model(path: str | Path) -> Any:
    """Load a checkpoint folder back with transformers (float32, eager attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()
