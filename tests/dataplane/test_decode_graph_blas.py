"""The decode graphs' BLAS library: set around their warm-up and capture only, restored after."""

from __future__ import annotations

import pytest
import torch

from dataplane.graphs import preferred_blas


class FakeBlasSetting:
    """Stands in for torch.backends.cuda.preferred_blas_library (a CPU build refuses cuBLASLt)."""

    def __init__(self) -> None:
        self.current = "cublas"
        self.calls: list[str] = []

    def __call__(self, backend: str | None = None) -> str:
        if backend is not None:
            self.calls.append(backend)
            self.current = backend
        return self.current


def test_the_decode_library_holds_inside_and_the_one_before_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBlasSetting()
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", fake)
    with preferred_blas("cublaslt"):
        assert fake.current == "cublaslt"
    assert fake.current == "cublas" and fake.calls == ["cublaslt", "cublas"]
    with pytest.raises(RuntimeError, match="capture failed"), preferred_blas("cublaslt"):
        raise RuntimeError("capture failed")
    assert fake.current == "cublas"  # restored on the way out of a failed capture too


def test_default_leaves_the_process_wide_choice_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBlasSetting()
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", fake)
    with preferred_blas("default"):
        assert fake.current == "cublas"
    assert fake.calls == []
