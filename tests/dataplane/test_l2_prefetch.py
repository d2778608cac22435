"""The decode graphs' L2 prefetch, on a CPU: the fused forward asks for each projection's weights
around the small kernel before that projection (QKV around the input norm, gate/up around the
post-attention norm, down around SwiGLU), joins every fork before the next one, and computes exactly
what it computes without a prefetcher. The prefetch kernel itself is inline PTX (CUDA only); the
GPU suite's `l2-prefetch` and `decode-prefetch` stages measure it."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dataplane.graphs import DecodeGraphs  # noqa: E402
from dataplane.kernels.l2_prefetch import L2Prefetch, prefetching  # noqa: E402
from dataplane.models.dense import DenseForCausalLM  # noqa: E402
from shared.config import DataplaneConfig  # noqa: E402
from tests.dataplane.test_piecewise import DEVICE, _batch, _caches, _step, model  # noqa: E402, F401


class RecordingPrefetch:
    """Stands in for L2Prefetch: records which weight each fork asked for, and that forks are joined."""

    def __init__(self, model: DenseForCausalLM) -> None:
        self.names = {p.data_ptr(): n for n, p in model.named_parameters()}
        self.forks: list[str] = []
        self.open = False
        self.joins = 0

    def fork(self, weight: torch.Tensor) -> None:
        assert not self.open, "a fork before the last one was joined"
        self.forks.append(self.names[weight.data_ptr()])
        self.open = True

    def join(self) -> None:  # like L2Prefetch.join: a no-op without an open fork
        if self.open:
            self.open = False
            self.joins += 1


def test_the_fused_forward_prefetches_each_projection_around_the_kernel_before_it(model) -> None:  # noqa: ANN001, F811
    batch = _batch([1, 1, 1], [5, 9, 2])
    plain = _step(model, batch, _caches(model, 0), None, seed=1)
    recorder = RecordingPrefetch(model)
    model.fused.prefetch = recorder
    try:
        prefetched = _step(model, batch, _caches(model, 0), None, seed=1)
    finally:
        model.fused.prefetch = None
    assert torch.equal(prefetched, plain)
    expected = []
    for i in range(model.cfg.num_layers):
        expected += [f"model.layers.{i}.self_attn.qkv_proj.weight", f"model.layers.{i}.mlp.gate_up_proj.weight",
                     f"model.layers.{i}.mlp.down_proj.weight"]
    assert recorder.forks == expected
    assert recorder.joins == len(expected) and not recorder.open


def test_a_fork_is_joined_when_the_kernel_between_raises(model) -> None:  # noqa: ANN001, F811
    recorder = RecordingPrefetch(model)
    weight = model.model.layers[0].mlp.down_proj.weight
    with pytest.raises(RuntimeError, match="inside"), prefetching(recorder, weight):  # type: ignore[arg-type]
        raise RuntimeError("inside")
    assert recorder.joins == 1 and not recorder.open
    with prefetching(None, weight):  # no prefetcher: the body only
        pass


def test_only_whole_gpu_graphs_are_captured_with_the_prefetch(model) -> None:  # noqa: ANN001, F811
    """DecodeGraphs hands the fused path its prefetcher while a "full" graph is captured, never for a
    partition's (an SM count), and takes it back afterwards, also when the capture raises."""
    recorder = RecordingPrefetch(model)
    graphs = SimpleNamespace(l2_prefetch=recorder, model=model)  # what _prefetching reads of a DecodeGraphs
    with DecodeGraphs._prefetching(graphs, "full"):  # type: ignore[arg-type]
        assert model.fused.prefetch is recorder
    assert model.fused.prefetch is None
    with DecodeGraphs._prefetching(graphs, 64):  # type: ignore[arg-type]
        assert model.fused.prefetch is None
    failing = DecodeGraphs._prefetching(graphs, "full")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="capture"), failing:
        raise RuntimeError("capture failed")
    assert model.fused.prefetch is None
    graphs.l2_prefetch = None  # none configured: nothing handed over
    with DecodeGraphs._prefetching(graphs, "full"):  # type: ignore[arg-type]
        assert model.fused.prefetch is None


def test_prefetch_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="positive byte count"):
        L2Prefetch(DEVICE, 0)
    with pytest.raises(ValueError, match="decode_l2_prefetch_kib"):
        DataplaneConfig(decode_l2_prefetch_kib=-1)
    assert DataplaneConfig().decode_l2_prefetch_kib == 0  # off unless asked
