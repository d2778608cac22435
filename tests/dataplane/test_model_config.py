"""ModelConfig: reading Hugging Face config folders, presets, parameter counts, KV sizing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dataplane.attention import make_backend
from dataplane.kv_cache import allocate_kv_cache, kv_bytes_per_block
from dataplane.models.config import ModelConfig, load_model_config
from dataplane.models.dense import DenseForCausalLM
from dataplane.models.loader import load_model
from dataplane.models.presets import PRESETS
from tests.dataplane.checkpoints import write_tiny_checkpoint
from tests.dataplane.paged_driver import PagedDriver


def _write_config(folder: Path, raw: dict, generation: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


LEGACY_LLAMA = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "tie_word_embeddings": False,
}


PRESETS_RAW_QWEN3 = {  # Qwen3-8B's config.json, less what the test leaves out
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960, "hidden_act": "silu",
    "tie_word_embeddings": False, "eos_token_id": 151645,
}


def test_legacy_llama_config_matches_preset(tmp_path: Path) -> None:
    cfg = load_model_config(_write_config(tmp_path / "llama-3.1-8b", LEGACY_LLAMA))
    preset = PRESETS["llama-3.1-8b"]
    assert cfg.head_dim == 128  # derived: hidden / heads
    assert cfg == preset


def test_transformers5_config_and_generation_eos(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "q", "qwen3", tied=True)
    raw = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in raw
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    cfg = load_model_config(folder)
    assert cfg.architecture == "qwen3" and cfg.qk_norm and cfg.tie_word_embeddings
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert cfg.eos_token_ids == (2, 7) and cfg.bos_token_id == 1
    assert (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)


def test_llama3_rope_parameters_are_read(tmp_path: Path) -> None:
    cfg = load_model_config(write_tiny_checkpoint(tmp_path / "l", "llama"))
    assert cfg.architecture == "llama" and not cfg.qk_norm
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling["original_max_position_embeddings"] == 32


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model_type": "mistral"}, "unsupported model_type"),
        ({"model_type": None}, "unsupported model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ],
)
def test_unsupported_configs_raise_value_error(tmp_path: Path, edit: dict, message: str) -> None:
    raw = {**LEGACY_LLAMA, **edit}
    with pytest.raises(ValueError, match=message):
        load_model_config(_write_config(tmp_path / "m", raw))


@pytest.mark.parametrize(("scaling", "message"), [
    ({"type": "linear", "rope_type": "llama3", "factor": 8.0}, "names two types"),
    ({"full_attention": {"rope_type": "default", "rope_theta": 1e6}}, "per layer type"),
])
def test_ambiguous_rope_parameters_are_refused(tmp_path: Path, scaling: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_model_config(_write_config(tmp_path / "m", {**LEGACY_LLAMA, "rope_scaling": scaling}))


def test_rope_type_and_legacy_type_that_agree_are_read(tmp_path: Path) -> None:
    scaling = {"type": "linear", "rope_type": "linear", "factor": 2.0}
    cfg = load_model_config(_write_config(tmp_path / "m", {**LEGACY_LLAMA, "rope_scaling": scaling}))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_left_out_fields_take_transformers_defaults(tmp_path: Path) -> None:
    """Qwen3Config's head_dim is 128 and its positions 32768; LlamaConfig's hidden / heads and 2048."""
    qwen = {k: v for k, v in PRESETS_RAW_QWEN3.items() if k not in ("head_dim", "max_position_embeddings")}
    qwen["hidden_size"] = 2048  # hidden / heads would be 64 (Qwen3-1.7B's shape, whose head_dim is 128)
    cfg = load_model_config(_write_config(tmp_path / "q", qwen))
    assert (cfg.head_dim, cfg.max_position_embeddings) == (128, 32768)
    llama = {k: v for k, v in LEGACY_LLAMA.items() if k not in ("max_position_embeddings", "rope_scaling")}
    cfg = load_model_config(_write_config(tmp_path / "l", llama))
    assert (cfg.head_dim, cfg.max_position_embeddings) == (128, 2048)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model_config(tmp_path)


def test_invalid_shapes_rejected() -> None:
    base = PRESETS["tiny"]
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(**{**base.__dict__, "num_kv_heads": 3})


def test_qwen3_8b_parameter_count() -> None:
    cfg = PRESETS["qwen3-8b"]
    assert cfg.num_params == pytest.approx(8.19e9, rel=0.01)
    assert PRESETS["qwen3-0.6b"].num_params == pytest.approx(0.596e9, rel=0.01)
    assert PRESETS["llama-3.1-8b"].num_params == pytest.approx(8.03e9, rel=0.01)


def test_num_params_matches_instantiated_modules() -> None:
    for tied in (False, True):
        cfg = ModelConfig(**{**PRESETS["tiny"].__dict__, "tie_word_embeddings": tied,
                             "attention_bias": True})
        with torch.device("meta"):
            model = DenseForCausalLM(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params


def test_tiny_preset_instantiates_and_runs() -> None:
    model, cfg = load_model("tiny", dtype=torch.float32, device=torch.device("cpu"), seed=3)
    assert cfg.vocab_size == 260 and cfg.bos_token_id == 256 and cfg.eos_token_ids == (257,)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params
    norm = model.model.layers[0].self_attn.q_norm
    assert norm is not None and torch.equal(norm.weight, torch.ones(16))
    driver = PagedDriver(model, [[256, 72, 105], [256, 33]])
    out = driver.step([(0, 3), (1, 2)])
    assert out[0].shape == (3, 260) and torch.isfinite(out[0]).all()
    again, _ = load_model("tiny", dtype=torch.float32, device=torch.device("cpu"), seed=3)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_kv_cache_layout_and_size() -> None:
    cfg = PRESETS["qwen3-8b"]
    assert kv_bytes_per_block(cfg, 16, torch.bfloat16) == 36 * 2 * 16 * 8 * 128 * 2
    tiny = PRESETS["tiny"]
    caches = allocate_kv_cache(tiny, 10, 16, torch.float32, "cpu")
    assert len(caches) == 2 and caches[0].shape == (10, 2, 16, 2, 16)
    total = sum(c.numel() * c.element_size() for c in caches)
    assert total == 10 * kv_bytes_per_block(tiny, 16, torch.float32)
    assert make_backend("auto", "cpu").name == "torch"


def test_the_config_dtype_names_are_the_loaders() -> None:
    """shared.config.DTYPES (checked at start-up, where torch is not imported) names exactly what the loader takes."""
    from dataplane.models.loader import _DTYPES, resolve_dtype
    from shared.config import DTYPES

    assert set(DTYPES) == {"auto", *_DTYPES}
    assert all(isinstance(resolve_dtype(name, "cpu"), torch.dtype) for name in DTYPES)


def test_a_worker_reads_its_checkpoints_config_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The max_model_len check and the model's build share one read of config.json (it was read twice),
    and a max_model_len past the model's positions is still refused before the weights load."""
    import dataplane.models.config as config_module
    from dataplane.worker import load_worker
    from shared.config import DataplaneConfig

    folder = write_tiny_checkpoint(tmp_path / "q", "qwen3")
    positions = load_model_config(folder).max_position_embeddings
    reads: list[str] = []
    real = config_module._read_json
    monkeypatch.setattr(config_module, "_read_json", lambda path: reads.append(Path(path).name) or real(path))
    loaded = load_worker(DataplaneConfig(model=str(folder), device="cpu", num_kv_blocks=16, block_size=4,
                                         max_model_len=positions))
    assert reads.count("config.json") == 1 and loaded.ready.max_model_len == positions
    with pytest.raises(ValueError, match=f"past the model's {positions} positions"):
        load_worker(DataplaneConfig(model=str(folder), device="cpu", num_kv_blocks=16, block_size=4,
                                    max_model_len=positions + 1))
