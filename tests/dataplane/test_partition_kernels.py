"""Partition-sized kernels on a CPU: the SM-count target is set inside the block and restored after
(also when the block raises); the multiplexer refuses the option without the device's SM count;
calibration measures a partition with its kernels sized as serving sizes them, under a cache key of
its own."""

from __future__ import annotations

import pytest
import torch

from dataplane.partition_kernels import sm_count_target
from shared.config import DataplaneConfig


@pytest.fixture(autouse=True)
def _no_carveout() -> None:
    before = torch._C._get_sm_carveout_experimental()
    yield
    torch._C._set_sm_carveout_experimental(before)


def test_the_target_is_set_inside_and_restored() -> None:
    torch._C._set_sm_carveout_experimental(None)
    with sm_count_target(100, 132):
        assert torch._C._get_sm_carveout_experimental() == 32
        with sm_count_target(16, 132):
            assert torch._C._get_sm_carveout_experimental() == 116
        assert torch._C._get_sm_carveout_experimental() == 32
    assert torch._C._get_sm_carveout_experimental() is None


def test_the_target_is_restored_when_the_block_raises() -> None:
    torch._C._set_sm_carveout_experimental(4)
    with pytest.raises(RuntimeError, match="boom"), sm_count_target(64, 132):
        assert torch._C._get_sm_carveout_experimental() == 68
        raise RuntimeError("boom")
    assert torch._C._get_sm_carveout_experimental() == 4


def test_the_whole_device_or_none_leaves_the_target_alone() -> None:
    torch._C._set_sm_carveout_experimental(None)
    for sms in (None, 132, 200):
        with sm_count_target(sms, 132):
            assert torch._C._get_sm_carveout_experimental() is None


def test_a_target_below_one_sm_is_refused() -> None:
    with pytest.raises(ValueError, match="SM count target must be >= 1"), sm_count_target(0, 132):
        pass


def test_the_multiplexer_needs_the_device_sm_count_for_partition_kernels() -> None:
    from dataplane.multiplex import Multiplexer

    with pytest.raises(ValueError, match="device's SM count"):
        Multiplexer(partitions=None, partition_kernels=True)  # type: ignore[arg-type]
    assert not Multiplexer(partitions=None).partition_kernels  # type: ignore[arg-type]


def test_the_calibration_cache_key_names_the_kernel_setup() -> None:
    from dataplane.worker import calibration_setup

    assert calibration_setup(DataplaneConfig()) == ""
    assert calibration_setup(DataplaneConfig(blas_library="cublaslt")) == "blas-cublaslt"
    sized = DataplaneConfig(blas_library="cublaslt", partition_kernels="partition")
    assert calibration_setup(sized) == "blas-cublaslt-kernels-partition"
    assert calibration_setup(DataplaneConfig(partition_kernels="partition", multiplexing=False)) == ""


@pytest.mark.parametrize("sized", [False, True])
def test_calibration_sizes_a_partitions_gemms_as_the_multiplexer_does(sized: bool, monkeypatch) -> None:  # noqa: ANN001
    from contextlib import nullcontext

    from dataplane.multiplex import Multiplexer
    from dataplane.worker import partition_calibration

    class Parts:
        def streams_by_size(self) -> dict[int, str]:
            return {16: "decode-stream", 116: "prefill-stream"}

    entered: list[str] = []
    monkeypatch.setattr(torch.cuda, "stream", lambda s: entered.append(s) or nullcontext())
    kwargs = partition_calibration(Multiplexer(Parts(), partition_kernels=sized, device_sms=132))  # type: ignore[arg-type]
    assert kwargs["sm_counts"] == [16, 116]
    before = torch._C._get_sm_carveout_experimental()
    with kwargs["partition"](16):  # type: ignore[operator]
        inside = torch._C._get_sm_carveout_experimental()
    assert entered == ["decode-stream"]
    assert inside == (132 - 16 if sized else before)
    assert torch._C._get_sm_carveout_experimental() == before
    assert partition_calibration(None) == {}
