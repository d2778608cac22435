"""Named model shapes for random-weight runs: a tiny byte-level model and real production shapes.

Presets carry only shapes and token ids (no weights, no tokenizer); `loader.load_model` fills them
with seeded random weights. This module must not import torch or read files.
"""

from __future__ import annotations

from dataplane.models.config import ModelConfig

TINY_BOS = 256
TINY_EOS = 257

_QWEN3_VOCAB = 151936
_QWEN3_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|> (generation_config.json)

PRESETS: dict[str, ModelConfig] = {
    # Byte-level toy: ids 0..255 are bytes, 256 = bos, 257 = eos, 258..259 spare.
    "tiny": ModelConfig(
        name="tiny",
        architecture="qwen3",
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attention_bias=False,
        qk_norm=True,
        eos_token_ids=(TINY_EOS,),
        bos_token_id=TINY_BOS,
    ),
    "qwen3-0.6b": ModelConfig(
        name="qwen3-0.6b",
        architecture="qwen3",
        vocab_size=_QWEN3_VOCAB,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_q_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        attention_bias=False,
        qk_norm=True,
        eos_token_ids=_QWEN3_EOS,
        bos_token_id=None,
    ),
    "qwen3-8b": ModelConfig(
        name="qwen3-8b",
        architecture="qwen3",
        vocab_size=_QWEN3_VOCAB,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        attention_bias=False,
        qk_norm=True,
        eos_token_ids=_QWEN3_EOS,
        bos_token_id=None,
    ),
    "llama-3.1-8b": ModelConfig(
        name="llama-3.1-8b",
        architecture="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        attention_bias=False,
        qk_norm=False,
        eos_token_ids=(128001, 128008, 128009),
        bos_token_id=128000,
    ),
}
