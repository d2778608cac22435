"""Default sampling parameters from a checkpoint's `generation_config.json`, as vLLM applies them
(`--generation-config auto`, its default): a request that leaves temperature, top_p, top_k, min_p or
repetition_penalty unset gets the model's value (Qwen3 ships temperature 0.6, top_p 0.95, top_k 20),
else the neutral one. `none` keeps the neutral defaults; a folder reads its generation_config.json.

Read once at start-up. This module only reads the file; validation applies the values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class SamplingDefaults:
    """What an unset field means. `top_k` 0 and `min_p` 0 are off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    source: str = "neutral"

    def overridden(self) -> dict[str, float]:
        """The fields that differ from the neutral defaults (what the model's config set)."""
        neutral = SamplingDefaults()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "source" and getattr(self, f.name) != getattr(neutral, f.name)}


def _number(config: dict[str, object], key: str, path: Path) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: {key} must be a finite number, got {value!r}")
    return float(value)


def _checked(defaults: SamplingDefaults, path: Path) -> SamplingDefaults:
    if defaults.temperature < 0 or not 0 < defaults.top_p <= 1 or defaults.top_k < 0 \
            or not 0 <= defaults.min_p <= 1 or defaults.repetition_penalty <= 0:
        raise ValueError(f"{path}: sampling defaults out of range: {defaults.overridden()}")
    return defaults


def load_sampling_defaults(model: str, generation_config: str = "auto") -> SamplingDefaults:
    """`generation_config`: auto (the model folder's file, when it is a folder with one), none, or a
    folder holding a generation_config.json."""
    if generation_config == "none":
        return SamplingDefaults()
    folder = Path(model if generation_config == "auto" else generation_config)
    path = folder / "generation_config.json"
    if not path.is_file():
        if generation_config != "auto":
            raise ValueError(f"--generation-config {generation_config}: no generation_config.json there")
        return SamplingDefaults()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    neutral = SamplingDefaults()
    values = {key: _number(config, key, path) for key in ("temperature", "top_p", "top_k", "min_p",
                                                          "repetition_penalty")}
    top_k = values["top_k"]
    return _checked(SamplingDefaults(
        temperature=neutral.temperature if values["temperature"] is None else values["temperature"],
        top_p=neutral.top_p if values["top_p"] is None else values["top_p"],
        top_k=neutral.top_k if top_k is None or top_k < 0 else int(top_k),
        min_p=neutral.min_p if values["min_p"] is None else values["min_p"],
        repetition_penalty=neutral.repetition_penalty if values["repetition_penalty"] is None
        else values["repetition_penalty"],
        source=str(path),
    ), path)
