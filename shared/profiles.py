"""Declared hardware profiles and named GPUs, for the latency model and the simulated data plane.

A declared profile is a built-in table, not a measurement: the data plane sends one when it cannot
measure (or to shape a curve it measured only in part), and the simulated worker answers with one.
An `ExecutionProfile` declares how the data plane launches a step (kernel tiles, fixed per-kernel
cost, host launch time of an eager step): priors of the latency model, which refits them online.
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

# One H200 (SXM, 132 SMs, 141 GB HBM3e) measured by DuetServe's own start-up calibration on its
# green-context partitions (benchmarks/results/predictor-h200-all.json, 2026-12-01; points smoothed to
# be monotone) and, for the whole device, by benchmarks/engine.py's ceilings (engine-h200-4eacc25.json).
H200_DECLARED = HardwareProfile(
    gpu="NVIDIA H200",
    sm_counts=[8, 16, 32, 48, 64, 96, 132],
    gemm_flops_per_s=[56e12, 111e12, 220e12, 333e12, 430e12, 605e12, 780e12],
    hbm_bytes_per_s=[0.65e12, 1.24e12, 2.16e12, 3.10e12, 3.66e12, 3.92e12, 4.23e12],
    source="declared",
    step_overhead_ms=0.0,
    detail="H200 calibration on green-context partitions + engine.py ceilings (PyTorch 2.11 cu130), 2026-12-01",
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
    "h200": GpuSpec(
        name="NVIDIA H200", sm_count=132, memory_bytes=143771 << 20,
        partition_granularity=8, min_partition_sms=8, profile=H200_DECLARED,
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


@dataclass(frozen=True)
class ExecutionProfile:
    """How a data plane runs a step on a device, beyond the roofline's FLOP/s and bytes/s.

    Device side: each step launches `num_layers * kernels_per_layer + kernels_per_step` kernels and
    each costs `kernel_us` on the GPU beyond its roofline (launch gap, ramp and tail), CUDA graph or
    not. The ragged (prefill) attention kernel computes `ragged_tile_rows` query rows per tile and
    query head, so a request with q new tokens pays ceil(q / tile) tiles; without
    `ragged_fuses_gqa` every query head reads its KV head's cache on its own. Host side: an eager
    step (no CUDA graph) cannot finish before the host has launched it, about
    `num_layers * eager_host_ms_per_layer + eager_host_ms_per_step`; a CUDA-graph step pays
    `graph_host_ms` (staging, attention planning) before its replay. A ragged step with at least
    `split_min_decodes` decode items (0: never) runs them in the decode kernel instead, one more
    attention kernel per layer. A pass the data plane replays as piecewise graphs (attention eager
    between them; `WorkerReady.piecewise_max_tokens`) waits on the host about
    `num_layers * piecewise_host_ms_per_layer + eager_host_ms_per_step` instead of the eager floor.
    These are declared priors: the predictor refits the host floors and an affine device correction
    online from measured steps.
    """

    kernels_per_layer: float = 0.0
    kernels_per_step: float = 0.0
    kernel_us: float = 0.0
    ragged_tile_rows: int = 1
    ragged_fuses_gqa: bool = True
    eager_host_ms_per_layer: float = 0.0
    eager_host_ms_per_step: float = 0.0
    graph_host_ms: float = 0.0
    split_min_decodes: int = 0
    piecewise_host_ms_per_layer: float = 0.0
    detail: str = ""

    def eager_floor_ms(self, num_layers: int) -> float:
        """Host time to launch one eager step of a model with `num_layers` layers."""
        return num_layers * self.eager_host_ms_per_layer + self.eager_host_ms_per_step

    def piecewise_floor_ms(self, num_layers: int) -> float:
        """Host time to launch one pass replayed as piecewise graphs (its attention eager)."""
        return num_layers * self.piecewise_host_ms_per_layer + self.eager_host_ms_per_step

    def kernels(self, num_layers: int) -> float:
        return num_layers * self.kernels_per_layer + self.kernels_per_step


# The CUDA data plane's mixed steps: at least this many leading decode rows go to the decode kernel
# (dataplane/attention/flashinfer_backend.py; FA3 would give each of them a whole 128-row tile).
FLASHINFER_SPLIT_MIN_DECODES = 32

# The largest prefill or mixed pass the CUDA data plane replays as piecewise graphs
# (dataplane/piecewise.py); above it a pass's GPU time hides its launches.
MAX_PIECEWISE_TOKENS = 1024

# Host launch of a piecewise pass, per layer: 2.4 ms for 128- and 512-token prefills on the 36-layer
# Qwen3-8B on an H200 (results/profile-step-h200-piecewise.json), less the per-step 1 ms. A mixed
# pass whose decode rows go to the decode kernel launches more (5.7 ms for 64 decodes + 512 tokens),
# but such a pass (>= 32 decodes) runs longer on the GPU than that (20.5 ms there), so one floor is kept.
PIECEWISE_HOST_MS_PER_LAYER = 0.04

# No launch model: the plain roofline (the online correction still learns fixed costs).
NEUTRAL_EXECUTION = ExecutionProfile(detail="no launch model: plain roofline")

# DuetServe's CUDA data plane (flashinfer FA3 ragged prefill on Hopper, tensor-core decode, fused
# Triton q/k-norm+RoPE+KV-write and SwiGLU) on an H100, Qwen3-8B (36 layers), commit 3eb555d,
# benchmarks/profile_step.py: an eager 128-token prefill step takes ~12 ms (host-launch-bound: its
# roofline is ~5.6 ms), a decode step B=64 at 2k context replayed as a CUDA graph runs ~430 kernels
# in ~13.4 ms of kernel time (~15.6 ms per step). flashinfer's FA3 plan uses 128-row query tiles
# and does not fuse a GQA group's query heads (scheduler.cuh, PrefillSM90Plan).
H100_FLASHINFER_EXECUTION = ExecutionProfile(
    kernels_per_layer=11.5,
    kernels_per_step=16.0,
    kernel_us=2.5,
    ragged_tile_rows=128,
    ragged_fuses_gqa=False,
    eager_host_ms_per_layer=0.3,
    eager_host_ms_per_step=1.0,
    graph_host_ms=1.0,
    split_min_decodes=FLASHINFER_SPLIT_MIN_DECODES,
    piecewise_host_ms_per_layer=PIECEWISE_HOST_MS_PER_LAYER,
    detail="declared: H100 + flashinfer FA3, profile_step.py at commit 3eb555d (host floor ~12 ms at 36 layers; "
           "piecewise passes ~2.4 ms, H200 at 5a47025)",
)

# The same data plane on a GPU without FA3 (flashinfer's FA2 ragged kernel packs a GQA group into
# its query tiles and picks 16- to 128-row tiles by batch): host and per-kernel costs as measured
# on the H100 (host-side, so roughly GPU-independent), the smallest tile.
FLASHINFER_FA2_EXECUTION = ExecutionProfile(
    kernels_per_layer=11.5, kernels_per_step=16.0, kernel_us=2.5, ragged_tile_rows=16, ragged_fuses_gqa=True,
    eager_host_ms_per_layer=0.3, eager_host_ms_per_step=1.0, graph_host_ms=1.0,
    split_min_decodes=FLASHINFER_SPLIT_MIN_DECODES, piecewise_host_ms_per_layer=PIECEWISE_HOST_MS_PER_LAYER,
    detail="declared: flashinfer FA2 tiles; host and per-kernel costs from the H100 measurement",
)

_HOPPER = ("h100", "h200", "h800", "h20", "gh200")


def execution_profile_for(gpu_name: str, attention_backend: str) -> ExecutionProfile:
    """The declared execution profile of a data plane: its GPU name and attention backend."""
    if not attention_backend.startswith("flashinfer"):
        return NEUTRAL_EXECUTION
    lowered = gpu_name.lower()
    return H100_FLASHINFER_EXECUTION if any(k in lowered for k in _HOPPER) else FLASHINFER_FA2_EXECUTION
