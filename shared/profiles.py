"""Declared hardware profiles and named GPUs, for the latency model and the simulated data plane.

A declared profile is a built-in table, not a measurement: the data plane sends one when it cannot
measure (or to shape a curve it measured only in part), and the simulated worker answers with one.
Pure data and small helpers; this module must not import torch, read files or decide policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.messages import HardwareProfile

_GIB = 1 << 30

# DESIGN.md, "Measured on an H100": one H100 SXM (132 SMs), green-context partitions of S SMs,
# device-to-device copy bandwidth (bytes read + written) and an 8k x 8k x 8k bf16 GEMM.
# The per-step overhead is an assumption (a CUDA-graph replay plus host handling), not a measurement.
H100_DECLARED = HardwareProfile(
    gpu="NVIDIA H100 80GB HBM3",
    sm_counts=[8, 16, 32, 48, 64, 96, 132],
    gemm_flops_per_s=[57e12, 115e12, 227e12, 344e12, 442e12, 637e12, 803e12],
    hbm_bytes_per_s=[0.64e12, 1.19e12, 2.09e12, 2.64e12, 2.78e12, 2.99e12, 3.01e12],
    source="declared",
    step_overhead_ms=0.3,
    detail="DESIGN.md H100 table (green-context partitions, PyTorch 2.11 cu130); overhead assumed",
)

# A nominal CPU: only keeps the latency model defined on machines without a GPU. One "SM" stands
# for the whole device (CPUs are never partitioned).
CPU_DECLARED = HardwareProfile(
    gpu="cpu",
    sm_counts=[1],
    gemm_flops_per_s=[50e9],
    hbm_bytes_per_s=[10e9],
    source="declared",
    step_overhead_ms=1.0,
    detail="nominal CPU figures, not measured",
)


@dataclass(frozen=True)
class GpuSpec:
    """A named GPU the simulated worker can pretend to be."""

    name: str
    sm_count: int
    memory_bytes: int
    partition_granularity: int  # SM counts of a partition are multiples of this
    min_partition_sms: int
    profile: HardwareProfile

    def partition_sizes(self) -> list[int]:
        return partition_sizes(self.sm_count, self.partition_granularity, self.min_partition_sms)


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec(
        name="NVIDIA H100 80GB HBM3", sm_count=132, memory_bytes=80 * _GIB,
        partition_granularity=8, min_partition_sms=8, profile=H100_DECLARED,
    ),
}


def partition_sizes(sm_count: int, granularity: int, minimum: int) -> list[int]:
    """SM counts one partition may take so that it and the remainder both have >= `minimum` SMs."""
    if granularity < 1 or minimum < 1:
        raise ValueError("granularity and minimum must be >= 1")
    first = -(-minimum // granularity) * granularity
    return [s for s in range(first, sm_count, granularity) if sm_count - s >= minimum]


def declared_profile_for(gpu_name: str) -> HardwareProfile | None:
    """The declared profile whose GPU this device name matches (e.g. 'NVIDIA H100 80GB HBM3')."""
    lowered = gpu_name.lower()
    for key, spec in GPUS.items():
        if key in lowered:
            return spec.profile
    return None


def gpu_spec(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}") from None
