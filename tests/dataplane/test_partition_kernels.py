"""Partition-sized kernels on a CPU: the SM-count target is set inside the block and restored after
(also when the block raises); the multiplexer refuses the option without the device's SM count."""

from __future__ import annotations

import pytest
import torch

from dataplane.partition_kernels import sm_count_target


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
