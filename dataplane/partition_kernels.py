"""Kernels sized for a green-context partition rather than the whole GPU (`partition_kernels`).

A kernel launched on a partition's stream still reads the device's SM count and sizes its grid for
every SM. Two places that matters, and what this module does about each while work is launched for a
partition:
- cuBLASLt picks tiles and split-K for the SMs it targets: torch's SM carveout sets that target (it
  reaches cuBLASLt GEMMs, so run with `blas_library="cublaslt"` for it to cover every GEMM);
- flashinfer's FA3 prefill schedules its work statically over one CTA per device SM, so on a
  partition of S SMs the CTAs past S run as a second wave: the attention backend plans a
  partition's prefill with FA2, whose grid is not tied to the SM count
  (`AttentionBackend.on_partition`).
`partition_kernels="partition"` does both; `"gemm"` the SM target alone (FA3 keeps the prefill: FA2
at 8k tokens is slower than FA3's second wave, results/multiplex-h200-partition-cublaslt.json).
It changes host-side launch settings only and restores them on exit; it decides no split.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def sm_count_target(sms: int | None, device_sms: int) -> Iterator[None]:
    """cuBLASLt GEMMs launched inside this block target `sms` SMs (None or the whole device: as set)."""
    if sms is None or sms >= device_sms:
        yield
        return
    if sms < 1:
        raise ValueError(f"an SM count target must be >= 1, got {sms}")
    previous = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(device_sms - sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(previous)
