"""Start-up calibration: the device's achievable GEMM FLOP/s `Pi(S)` and HBM bandwidth `BW(S)` on S SMs.

On CUDA it times a square GEMM in the serving dtype and a device-to-device copy (bytes read plus
written) with CUDA events, on the whole device and, through a `PartitionProvider` (a callable that
returns a context manager running the enclosed work on an S-SM partition, e.g. a green-context
stream), on each candidate partition size. Without a provider only the whole device is measured;
if a declared curve exists for the GPU (shared.profiles) its shape is rescaled to the measured
point (`source="scaled"`), else the profile holds that one point (`source="measured"`). Results
are cached as JSON keyed by GPU name, SM count, driver and CUDA versions and the kernel setup
(`setup`: the BLAS library and whether partitions' kernels are sized for them, which change the
GEMM rates measured; default `~/.cache/duetserve`); a cache hit says `source="cached"`. On CPU a
tiny matmul and copy give a measured one-point profile in milliseconds. `detail` always says which points were measured.

This module measures and reports; it decides nothing about scheduling.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from shared.messages import HardwareProfile
from shared.profiles import declared_profile_for

log = logging.getLogger(__name__)

PartitionProvider = Callable[[int], AbstractContextManager[object]]
DEFAULT_CACHE_DIR = Path(os.environ.get("DUETSERVE_CACHE_DIR", Path.home() / ".cache" / "duetserve"))


@dataclass(frozen=True)
class Sizes:
    """Workload sizes of one measurement point."""

    gemm_n: int = 8192
    copy_bytes: int = 1 << 30
    warmup: int = 3
    iters: int = 10


CPU_SIZES = Sizes(gemm_n=256, copy_bytes=8 << 20, warmup=2, iters=5)


def load_partition_provider(spec: str) -> PartitionProvider:
    """`module:attr` naming a PartitionProvider (the green-context partitions plug in here)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"partition provider must look like 'module:attr', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def _time_ms(fn: Callable[[], object], device: torch.device, sizes: Sizes) -> float:
    """Mean milliseconds of `fn` over `sizes.iters` runs after `sizes.warmup` (CUDA events on GPU)."""
    for _ in range(sizes.warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(sizes.iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / sizes.iters
    t0 = time.perf_counter()
    for _ in range(sizes.iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / sizes.iters


def measure_gemm_flops(device: torch.device, dtype: torch.dtype, sizes: Sizes) -> float:
    n = sizes.gemm_n
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = _time_ms(lambda: torch.matmul(a, b, out=out), device, sizes)
    return 2.0 * n**3 / (ms / 1e3)


def measure_copy_bandwidth(device: torch.device, sizes: Sizes) -> float:
    """Bytes read plus written per second by a device-to-device copy."""
    src = torch.empty(sizes.copy_bytes, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, sizes)
    return 2.0 * sizes.copy_bytes / (ms / 1e3)


def measure_points(device: torch.device, dtype: torch.dtype, sm_counts: list[int], full_sms: int,
                   partition: PartitionProvider | None, sizes: Sizes) -> dict[int, tuple[float, float]]:
    """{S: (FLOP/s, bytes/s)} for the whole device and, with a provider, every partition size."""
    points: dict[int, tuple[float, float]] = {}
    for sms in sorted(set(sm_counts) | {full_sms}):
        if sms != full_sms and partition is None:
            continue
        with partition(sms) if partition is not None and sms != full_sms else nullcontext():
            points[sms] = (measure_gemm_flops(device, dtype, sizes), measure_copy_bandwidth(device, sizes))
    return points


def profile_from_points(gpu: str, points: dict[int, tuple[float, float]], full_sms: int,
                        driver: str = "") -> HardwareProfile:
    """A measured profile; with only the whole device measured, a declared curve is rescaled to it."""
    sms = sorted(points)
    measured = f"measured on {', '.join(map(str, sms))} SMs"
    declared = declared_profile_for(gpu)
    if sms == [full_sms] and declared is not None and declared.sm_counts[-1] == full_sms:
        flops, bw = points[full_sms]
        f_scale, b_scale = flops / declared.gemm_flops_per_s[-1], bw / declared.hbm_bytes_per_s[-1]
        return HardwareProfile(
            gpu=gpu, sm_counts=list(declared.sm_counts),
            gemm_flops_per_s=[v * f_scale for v in declared.gemm_flops_per_s],
            hbm_bytes_per_s=[v * b_scale for v in declared.hbm_bytes_per_s],
            source="scaled", driver=driver,
            detail=f"{measured}; other SM counts: declared curve ({declared.detail}) scaled by "
                   f"{f_scale:.3f} (FLOP/s) and {b_scale:.3f} (bytes/s)",
        )
    return HardwareProfile(gpu=gpu, sm_counts=sms, gemm_flops_per_s=[points[s][0] for s in sms],
                           hbm_bytes_per_s=[points[s][1] for s in sms], source="measured", driver=driver,
                           detail=measured)


def cache_path(cache_dir: Path, gpu: str, sm_count: int, driver: str, setup: str = "", dtype: str = "") -> Path:
    """`setup` names the kernel choices the measurement depends on ("" for the defaults); `dtype` the
    dtype the GEMM rate was measured in ("" for bfloat16, the serving default: a float32 run's rate is
    another profile)."""
    dtype = "" if dtype in ("", "bfloat16") else dtype
    parts = [f"{gpu}-{sm_count}sm-{driver}", setup, dtype]
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(p for p in parts if p)).strip("-")
    return cache_dir / f"profile-{slug}.json"


def load_cached(path: Path) -> HardwareProfile | None:
    """The profile as it was saved (its own source), or None."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=HardwareProfile)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def as_cached(profile: HardwareProfile) -> HardwareProfile:
    return msgspec.structs.replace(profile, source="cached", detail=f"{profile.source}: {profile.detail}")


def save_cached(path: Path, profile: HardwareProfile) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(msgspec.to_builtins(profile), indent=1))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not cache the hardware profile at %s: %s", path, exc)


def _driver(device: torch.device) -> str:
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    driver = str(getter()) if getter is not None else "unknown"
    return f"driver{driver}-cuda{torch.version.cuda}"


def cpu_profile() -> HardwareProfile:
    device = torch.device("cpu")
    points = {1: (measure_gemm_flops(device, torch.float32, CPU_SIZES), measure_copy_bandwidth(device, CPU_SIZES))}
    profile = profile_from_points("cpu", points, 1)
    return msgspec.structs.replace(profile, detail="whole CPU as one 'SM': " + profile.detail)


def calibrate(device: torch.device, dtype: torch.dtype, cache_dir: str | Path | None = None, *,
              sm_counts: list[int] | None = None, partition: PartitionProvider | None = None,
              setup: str = "") -> HardwareProfile:
    """The device's profile: cached if this GPU, driver, kernel `setup` and `dtype` were measured before,
    else measured now."""
    if device.type != "cuda":
        return cpu_profile()
    props = torch.cuda.get_device_properties(device)
    driver = _driver(device)
    path = cache_path(Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR, props.name, props.multi_processor_count,
                      driver, setup, str(dtype).removeprefix("torch."))
    cached = load_cached(path)
    wanted = set(sm_counts or []) | {props.multi_processor_count}
    if cached is not None and (partition is None or (cached.source == "measured" and wanted <= set(cached.sm_counts))):
        return as_cached(cached)
    start = time.monotonic()
    with torch.cuda.device(device):
        points = measure_points(device, dtype, sorted(wanted), props.multi_processor_count, partition, Sizes())
    profile = profile_from_points(props.name, points, props.multi_processor_count, driver)
    log.info("calibrated %s in %.1f s: %s", props.name, time.monotonic() - start, profile.detail)
    save_cached(path, profile)
    return profile
