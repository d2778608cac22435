"""The shape of a dense decoder-only model (Qwen3 or Llama-3), and reading it from a checkpoint folder.

`ModelConfig` is frozen and built once; `load_model_config` reads a Hugging Face `config.json`
(plus `generation_config.json` for end-of-sequence ids) without importing transformers.
This module must not import torch or touch weights, and must not guess at unsupported features:
anything it cannot run faithfully (other model types, sliding windows, MLP biases, exotic RoPE)
is rejected with a ValueError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Architecture = Literal["qwen3", "llama"]
SUPPORTED_ROPE_TYPES = ("llama3", "linear")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and constants of a dense GQA transformer with RoPE, RMSNorm and SwiGLU."""

    name: str
    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_q_heads", "num_kv_heads", "head_dim", "max_position_embeddings")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"unsupported rope scaling type {rope_type!r}; "
                                 f"supported: {SUPPORTED_ROPE_TYPES} or none")

    @property
    def q_size(self) -> int:
        """Width of the query projection output."""
        return self.num_q_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (or value) projection output."""
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Exact parameter count of `DenseForCausalLM` for this config (tied weights counted once)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size + h
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_layers * layer + h + lm_head


def _read_json(path: Path) -> dict[str, Any]:
    with path.open("r", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"token id must be an int or a list of ints, got {value!r}")


def _parse_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, rope_scaling) from either the transformers-5 or the legacy layout."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling: dict[str, Any] | None = dict(params)
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        legacy = raw.get("rope_scaling")
        scaling = dict(legacy) if isinstance(legacy, dict) else None
    if scaling is None:
        return theta, None
    scaling.pop("rope_theta", None)
    nested = sorted(k for k, v in scaling.items() if isinstance(v, dict))
    if nested:  # per layer type ({"full_attention": {...}, ...}): no single RoPE to build
        raise ValueError(f"unsupported rope parameters per layer type: {nested}")
    legacy_type, rope_type = scaling.pop("type", None), scaling.get("rope_type")
    if legacy_type and rope_type and legacy_type != rope_type:
        raise ValueError(f"rope scaling names two types, type={legacy_type!r} and rope_type={rope_type!r}")
    rope_type = rope_type or legacy_type or "default"
    scaling["rope_type"] = rope_type
    if rope_type == "default":
        return theta, None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; "
                         f"supported: {SUPPORTED_ROPE_TYPES} or none")
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in scaling:
                raise ValueError(f"llama3 rope scaling is missing {key!r}")
        scaling.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    if rope_type == "linear" and "factor" not in scaling:
        raise ValueError("linear rope scaling is missing 'factor'")
    return theta, scaling


def _check_supported(raw: dict[str, Any], model_type: str) -> None:
    """Reject checkpoint features this implementation would silently get wrong."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if raw.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"only full_attention layers are supported, got {sorted(set(layer_types))}")
    if float(raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")


def _eos_ids(raw: dict[str, Any], folder: Path) -> tuple[int, ...]:
    ids = _as_id_list(raw.get("eos_token_id"))
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        ids += _as_id_list(_read_json(gen_path).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))


def load_model_config(folder: str | Path) -> ModelConfig:
    """Read `folder/config.json` (and `generation_config.json` if present) into a ModelConfig.

    Raises FileNotFoundError when config.json is absent and ValueError for unsupported models.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    raw = _read_json(config_path)
    model_type = raw.get("model_type")
    if model_type not in ("qwen3", "llama"):
        raise ValueError(f"unsupported model_type {model_type!r} in {config_path}; "
                         "supported: 'qwen3', 'llama'")
    _check_supported(raw, model_type)
    theta, scaling = _parse_rope(raw)
    hidden = int(raw["hidden_size"])
    num_q_heads = int(raw["num_attention_heads"])
    # transformers' defaults where config.json leaves these out: Qwen3Config's head_dim 128 and 32768
    # positions, LlamaConfig's hidden / heads and 2048
    head_dim = raw.get("head_dim") or (128 if model_type == "qwen3" else hidden // num_q_heads)
    default_positions = 32768 if model_type == "qwen3" else 2048
    bos = raw.get("bos_token_id")
    return ModelConfig(
        name=folder.resolve().name,
        architecture=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_q_heads=num_q_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_q_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", default_positions)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        eos_token_ids=_eos_ids(raw, folder),
        bos_token_id=int(bos) if isinstance(bos, int) else None,
    )
