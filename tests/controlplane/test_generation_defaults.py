"""Sampling defaults from a checkpoint's generation_config.json (vLLM's --generation-config auto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controlplane.generation_defaults import SamplingDefaults, load_sampling_defaults
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.tokenizer import ByteTokenizer
from controlplane.validation import Limits, validate_generate

QWEN3 = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
         "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}


def _folder(tmp_path: Path, config: object) -> Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_checkpoints_generation_config_sets_the_defaults(tmp_path: Path) -> None:
    defaults = load_sampling_defaults(str(_folder(tmp_path, QWEN3)))
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.min_p, defaults.repetition_penalty) == (
        0.6, 0.95, 20, 0.0, 1.0)
    assert defaults.overridden() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert load_sampling_defaults(str(tmp_path), "none") == SamplingDefaults()
    assert load_sampling_defaults("tiny") == SamplingDefaults()  # a preset has no file
    (tmp_path / "other").mkdir()
    other = _folder(tmp_path / "other", {"top_k": -1, "repetition_penalty": 1.05})
    assert load_sampling_defaults("tiny", str(other)).overridden() == {"repetition_penalty": 1.05}  # top_k -1: off


@pytest.mark.parametrize("config,message", [
    ({"temperature": "hot"}, "temperature must be a finite number"),
    ({"top_p": 0.0}, "sampling defaults out of range"),
    ([1, 2], "not a JSON object"),
])
def test_a_bad_generation_config_is_a_clear_error(tmp_path: Path, config: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_sampling_defaults(str(_folder(tmp_path, config)))


def test_a_folder_without_the_file_is_an_error_when_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no generation_config.json there"):
        load_sampling_defaults("tiny", str(tmp_path))


def test_unset_fields_take_the_defaults_and_set_ones_win(tmp_path: Path) -> None:
    defaults = load_sampling_defaults(str(_folder(tmp_path, {**QWEN3, "min_p": 0.05})))
    limits = Limits(vocab_size=260, max_model_len=64)
    tok = ByteTokenizer()
    unset = validate_generate(pb.GenerateRequest(text="hi"), tok, limits, None, defaults).sampling
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p) == pytest.approx((0.6, 0.95, 20, 0.05))
    explicit = validate_generate(pb.GenerateRequest(text="hi", temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),
                                 tok, limits, None, defaults).sampling
    assert (explicit.temperature, explicit.top_p, explicit.top_k, explicit.min_p) == (1.0, 1.0, 0, 0.0)
    off = validate_generate(pb.GenerateRequest(text="hi", top_k=-1), tok, limits, None, defaults).sampling
    assert off.top_k == 0
    neutral = validate_generate(pb.GenerateRequest(text="hi"), tok, limits).sampling
    assert (neutral.temperature, neutral.top_p, neutral.top_k, neutral.min_p) == (1.0, 1.0, 0, 0.0)
