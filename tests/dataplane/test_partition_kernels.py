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
    assert calibration_setup(DataplaneConfig(decode_blas_library="cublaslt")) == "decode-blas-cublaslt"
    assert calibration_setup(DataplaneConfig(decode_l2_prefetch_kib=8192)) == "l2-prefetch-8192"
    # the profile measures GEMM and copy rates, which the norms' placement does not change
    assert calibration_setup(DataplaneConfig(epilogue_norm_rows=256)) == ""


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


@pytest.mark.parametrize(("mode", "want_target", "want_fa2"), [
    ("device", None, False), ("gemm", 132 - 100, False), ("partition", 132 - 100, True)])
def test_a_partitions_prefill_is_sized_as_the_mode_says(mode: str, want_target: int | None, want_fa2: bool) -> None:
    from contextlib import contextmanager

    from dataplane.multiplex import Multiplexer
    from dataplane.partition_menu import Split
    from dataplane.partitions import Partition

    seen: list[tuple[int, bool]] = []

    class Backend:
        fa2 = False

        @contextmanager
        def on_partition(self):  # noqa: ANN202
            Backend.fa2 = True
            try:
                yield
            finally:
                Backend.fa2 = False

    class Runner:
        backend = Backend()

        def _run(self, items, steps, pending, eager) -> None:  # noqa: ANN001
            seen.append((torch._C._get_sm_carveout_experimental(), Backend.fa2))

    before = torch._C._get_sm_carveout_experimental()
    part = Partition(split=Split(decode_sms=32, prefill_sms=100), decode_stream=None, prefill_stream=None,  # type: ignore[arg-type]
                     actual_decode_sms=32, actual_prefill_sms=100)
    mux = Multiplexer(None, mode != "device", 132, fa2_prefill=mode == "partition")  # type: ignore[arg-type]
    assert mux.fa2_prefill == want_fa2
    mux._prefill(Runner(), [], None, part)  # type: ignore[arg-type]
    assert seen == [(before if want_target is None else want_target, want_fa2)]
    assert torch._C._get_sm_carveout_experimental() == before and not Backend.fa2
