"""Calibration on the CPU: measured CPU profile, partition provider plumbing, declared-curve scaling, cache."""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dataplane.calibration import (
    Sizes, as_cached, cache_path, calibrate, load_cached, load_partition_provider, measure_points,
    profile_from_points, save_cached,
)
from shared.profiles import H100_DECLARED

TINY = Sizes(gemm_n=32, copy_bytes=1 << 16, warmup=1, iters=2)


def test_cpu_profile_is_measured_and_one_point() -> None:
    profile = calibrate(torch.device("cpu"), torch.float32)
    assert profile.source == "measured" and profile.sm_counts == [1] and profile.gpu == "cpu"
    assert profile.gemm_flops_per_s[0] > 1e6 and profile.hbm_bytes_per_s[0] > 1e6
    assert "measured" in profile.detail


def test_partition_provider_runs_each_point_inside_its_partition() -> None:
    entered: list[int] = []

    @contextmanager
    def partition(sms: int) -> Iterator[None]:
        entered.append(sms)
        yield

    points = measure_points(torch.device("cpu"), torch.float32, [16, 8, 132], 132, partition, TINY)
    assert sorted(points) == [8, 16, 132] and entered == [8, 16]  # the whole device needs no partition
    assert sorted(measure_points(torch.device("cpu"), torch.float32, [8, 16], 132, None, TINY)) == [132]


def test_whole_device_point_rescales_the_declared_curve() -> None:
    full = (H100_DECLARED.gemm_flops_per_s[-1] * 0.9, H100_DECLARED.hbm_bytes_per_s[-1] * 1.1)
    profile = profile_from_points("NVIDIA H100 80GB HBM3", {132: full}, 132, "d1")
    assert profile.source == "scaled" and profile.sm_counts == H100_DECLARED.sm_counts
    assert profile.gemm_flops_per_s[0] == pytest.approx(57e12 * 0.9)
    assert profile.hbm_bytes_per_s[-1] == pytest.approx(full[1])
    assert "measured on 132 SMs" in profile.detail and "scaled" in profile.detail
    unknown = profile_from_points("Some GPU", {100: (1e14, 1e12)}, 100)
    assert unknown.source == "measured" and unknown.sm_counts == [100]
    several = profile_from_points("NVIDIA H100 80GB HBM3", {64: (4e14, 2.7e12), 132: full}, 132)
    assert several.source == "measured" and several.sm_counts == [64, 132]


def test_cache_round_trip_is_keyed_by_gpu_and_driver(tmp_path: Path) -> None:
    profile = profile_from_points("NVIDIA H100 80GB HBM3", {132: (8e14, 3e12)}, 132, "driver1")
    path = cache_path(tmp_path, profile.gpu, 132, "driver1")
    save_cached(path, profile)
    loaded = load_cached(path)
    assert loaded == profile
    cached = as_cached(loaded)
    assert cached.source == "cached" and cached.detail.startswith("scaled: ")
    assert cache_path(tmp_path, profile.gpu, 132, "driver2") != path
    lt = cache_path(tmp_path, profile.gpu, 132, "driver1", "blas-cublaslt-kernels-partition")
    assert lt != path and "cublaslt-kernels-partition" in lt.name  # another kernel setup, another entry
    assert cache_path(tmp_path, profile.gpu, 132, "driver1", "") == path
    assert cache_path(tmp_path, profile.gpu, 132, "driver1", dtype="bfloat16") == path  # the serving default
    f32 = cache_path(tmp_path, profile.gpu, 132, "driver1", dtype="float32")  # another GEMM rate, another file
    assert f32 != path and f32 != cache_path(tmp_path, profile.gpu, 132, "driver1", "", "float16")
    assert load_cached(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert load_cached(tmp_path / "bad.json") is None


def test_partition_provider_spec() -> None:
    provider = load_partition_provider("contextlib:nullcontext")
    with provider(8):
        pass
    with pytest.raises(ValueError):
        load_partition_provider("no-colon")
