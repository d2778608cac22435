"""Build a `DenseForCausalLM` from a preset (seeded random weights) or a Hugging Face folder.

Checkpoints are read with safetensors only (single file or sharded with an index); weights are
copied into a model materialised directly on the target device and dtype. This module must not
import transformers, must not download anything, and must not choose serving policy (KV sizes,
batch limits): it returns the model and its config, nothing else.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dataplane.models.config import ModelConfig, load_model_config
from dataplane.models.dense import DenseForCausalLM
from dataplane.models.presets import PRESETS

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
INIT_STD = 0.02
# Checkpoint entries that are derived buffers in some exports, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """"auto" -> float32 on CPU, bfloat16 on CUDA; otherwise a dtype name like "bfloat16"."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16") from None


def model_config(model: str) -> ModelConfig:
    """The config of a preset name or a checkpoint folder (its config.json, read once per call)."""
    if model in PRESETS:
        return PRESETS[model]
    if Path(model).is_dir():
        return load_model_config(model)
    raise ValueError(f"model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     "nor a checkpoint folder")


def load_model(model: str, *, dtype: torch.dtype, device: torch.device, seed: int = 0,
               cfg: ModelConfig | None = None) -> tuple[DenseForCausalLM, ModelConfig]:
    """Load a preset name (random weights) or a checkpoint folder; returns (model in eval mode, cfg).
    `cfg`, when given, is `model_config(model)` already read (the config is not read again)."""
    device = torch.device(device)
    cfg = model_config(model) if cfg is None else cfg
    net = _materialise(cfg, dtype, device)
    if model in PRESETS:
        init_random_weights(net, seed)
    else:
        load_checkpoint_weights(net, Path(model))
    net.eval()
    net.requires_grad_(False)
    return net, cfg


def _materialise(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> DenseForCausalLM:
    """Build on the meta device (no init cost), then allocate uninitialised storage on `device`."""
    with torch.device("meta"):
        net = DenseForCausalLM(cfg)
    net = net.to(dtype=dtype).to_empty(device=device)
    net.tie_weights()  # to_empty gives the two tied names separate storage; share it again
    net.model.rotary_emb.reset_cache()
    return net


@torch.no_grad()
def init_random_weights(net: nn.Module, seed: int) -> None:
    """normal(0, 0.02) for matrices and embeddings, ones for norms, zeros for biases.

    Numbers are drawn on the parameters' device from a generator seeded with `seed`, so on CUDA
    an 8B model initialises in seconds. Tied parameters are drawn once.
    """
    gen: torch.Generator | None = None
    for name, param in net.named_parameters():  # de-duplicates tied parameters
        if gen is None:
            gen = torch.Generator(device=param.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, INIT_STD, generator=gen)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from the shard index if there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder} (other formats are not supported)")
    return files


@torch.no_grad()
def load_checkpoint_weights(net: DenseForCausalLM, folder: Path) -> None:
    """Copy every tensor of the checkpoint into `net` (casting dtype); strict about names/shapes. The
    shards are loaded one at a time, each closed when done (all open at once would keep every shard's
    pages mapped for the whole load); their keys are read first, from the headers (`_skipped_keys`)."""
    params = dict(net.named_parameters(remove_duplicate=False))
    files = checkpoint_files(folder)
    skip = _skipped_keys(files, net.cfg.tie_word_embeddings)
    seen: set[str] = set()
    unexpected: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith(_IGNORED_SUFFIXES) or key in skip:
                    continue
                if key not in params:
                    unexpected.append(key)
                    continue
                _copy_param(params[key], f.get_tensor(key), key)
                seen.add(key)
    missing = sorted(set(params) - seen)
    if net.cfg.tie_word_embeddings:
        missing = [k for k in missing if k not in ("lm_head.weight", "model.embed_tokens.weight")]
        if "lm_head.weight" not in seen and "model.embed_tokens.weight" not in seen:
            missing.append("model.embed_tokens.weight")
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: "
                         f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                         f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")


def _skipped_keys(files: list[Path], tied: bool) -> set[str]:
    """Checkpoint tensors not to load. A tensor stored in two files is an error (which one would win
    depended on file order). With tied embeddings and both tensors stored, `lm_head.weight` is left
    out and the embedding serves both, as vLLM does."""
    counts: Counter[str] = Counter()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            counts.update(f.keys())
    twice = sorted(k for k, n in counts.items() if n > 1)
    if twice:
        raise ValueError(f"checkpoint tensors stored in more than one file: {twice[:10]}")
    if tied and "lm_head.weight" in counts and "model.embed_tokens.weight" in counts:
        log.warning("the config ties the embeddings: the checkpoint's lm_head.weight is ignored and "
                    "model.embed_tokens.weight serves both (as in vLLM)")
        return {"lm_head.weight"}
    return set()


def _copy_param(param: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, "
                         f"the model expects {tuple(param.shape)}")
    param.copy_(value)
