"""Config structs reject bad values with a message naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import BLAS_LIBRARIES, PARTITION_KERNELS, DataplaneConfig

ROOT = Path(__file__).resolve().parents[2]


def test_blas_library_is_checked() -> None:
    for name in BLAS_LIBRARIES:
        assert DataplaneConfig(blas_library=name).blas_library == name
    with pytest.raises(ValueError, match="blas_library must be one of default, cublas, cublaslt"):
        DataplaneConfig(blas_library="mkl")


def test_dataplane_cli_refuses_an_unknown_blas_library() -> None:
    out = subprocess.run([sys.executable, "-m", "dataplane", "--blas-library", "mkl"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--blas-library" in out.stderr


def test_partition_kernels_is_checked() -> None:
    assert DataplaneConfig().partition_kernels == "device"
    for name in PARTITION_KERNELS:
        assert DataplaneConfig(partition_kernels=name).partition_kernels == name
    with pytest.raises(ValueError, match="partition_kernels must be one of device, partition, got 'half'"):
        DataplaneConfig(partition_kernels="half")
