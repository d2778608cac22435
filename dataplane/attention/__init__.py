"""Attention backends behind one interface, and the factory that picks one for a device.

This package must not import flashinfer (or any CUDA-only library) at import time: GPU backends
are imported lazily inside `make_backend`, and only for CUDA devices.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from dataplane.attention.base import AttentionBackend, AttentionBatch, AttentionShape
from dataplane.attention.torch_paged import TorchPagedAttention
from shared.config import ATTENTION_BACKENDS

__all__ = ["AttentionBackend", "AttentionBatch", "TorchPagedAttention", "make_backend"]

BACKENDS = ATTENTION_BACKENDS
log = logging.getLogger(__name__)


def make_backend(name: str, device: torch.device | str, shape: AttentionShape | None = None) -> AttentionBackend:
    """Build the attention backend `name` ("auto" | "torch" | "flashinfer") for `device`.

    "auto" is flashinfer on CUDA and torch on CPU; on CUDA without flashinfer installed (an image built
    without the `gpu` extra) it is torch, with a warning: slower attention and no CUDA graphs, rather than
    a data plane that cannot start. flashinfer needs the attention `shape`.
    """
    device = torch.device(device)
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" else "torch"
        if name == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
            log.warning("flashinfer is not installed (pip install 'duetserve[gpu]'): attention runs on the torch "
                        "backend, without CUDA graphs or SM partitions")
            name = "torch"
    if name == "torch":
        return TorchPagedAttention()
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError(f"the flashinfer attention backend needs a CUDA device, got {device}")
        if shape is None:
            raise ValueError("the flashinfer attention backend needs the model's attention shape")
        from dataplane.attention.flashinfer_backend import FlashInferAttention  # lazy: imports flashinfer

        return FlashInferAttention(shape, device)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
