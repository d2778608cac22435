"""The GPU tests' checkpoints (module-scoped, built only where a test asks for one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dataplane.gpu_support import save_qwen3


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_qwen3(tmp_path_factory.mktemp("gpu-ckpt"))


@pytest.fixture(scope="module")
def gpu_checkpoint_norms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_qwen3(tmp_path_factory.mktemp("gpu-ckpt-norms"), norms=True)
