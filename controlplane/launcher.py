"""Starts the data plane as a child process and makes sure it never outlives the control plane.

The child runs `python -m dataplane` with flags built from DataplaneConfig (`duetserve simulate`
starts the simulated one, `python -m dataplane.sim_worker`) in a session of its own; given
`--parent-pid` it asks Linux for SIGTERM when this process dies (PR_SET_PDEATHSIG) itself. No Python
code runs between fork and exec (no preexec_fn): with gRPC threads in this process a forked child could
hang there.
No policy here, no torch import.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from shared.config import DEFAULT_BLOCK_SIZE, DataplaneConfig
from shared.telemetry_flags import trace_args

log = logging.getLogger(__name__)

def dataplane_args(config: DataplaneConfig) -> list[str]:
    args = [
        "--model", config.model,
        "--endpoint", config.endpoint,
        "--device", config.device,
        "--dtype", config.dtype,
        "--block-size", str(config.block_size),
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
        "--cpu-kv-cache-bytes", str(config.cpu_kv_cache_bytes),
        "--attention-backend", config.attention_backend,
        "--seed", str(config.seed),
        "--max-num-batched-tokens", str(config.max_num_batched_tokens),
        "--max-num-seqs", str(config.max_num_seqs),
    ]
    if not config.cuda_graphs:
        args.append("--no-cuda-graphs")
    if not config.piecewise_graphs:
        args.append("--no-piecewise-graphs")
    if config.partition_kernels != "device":
        args += ["--partition-kernels", config.partition_kernels]
    if config.blas_library != "default":
        args += ["--blas-library", config.blas_library]
    if config.cublas_workspace_config is not None:
        args += ["--cublas-workspace-config", config.cublas_workspace_config]
    if config.decode_blas_library != "default":
        args += ["--decode-blas-library", config.decode_blas_library]
    if config.decode_l2_prefetch_kib:
        args += ["--decode-l2-prefetch-kib", str(config.decode_l2_prefetch_kib)]
    if config.epilogue_norm_rows != DataplaneConfig().epilogue_norm_rows:
        args += ["--epilogue-norm-rows", str(config.epilogue_norm_rows)]
    if config.decode_gemm_rows != DataplaneConfig().decode_gemm_rows:
        args += ["--decode-gemm-rows", str(config.decode_gemm_rows)]
    if not config.multiplexing:
        args.append("--no-multiplexing")
    if config.decode_partition_sms:
        args += ["--decode-partition-sms", ",".join(map(str, config.decode_partition_sms))]
    if config.num_kv_blocks is not None:
        args += ["--num-kv-blocks", str(config.num_kv_blocks)]
    if config.max_model_len is not None:
        args += ["--max-model-len", str(config.max_model_len)]
    if config.health_file is not None:
        args += ["--health-file", config.health_file]
    if config.calibration_cache_dir is not None:
        args += ["--calibration-cache-dir", config.calibration_cache_dir]
    if config.allow_remote:
        args.append("--allow-remote")
    return args + trace_args(config.telemetry)


def spawn_dataplane(config: DataplaneConfig, log_level: str = "INFO") -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "dataplane", *dataplane_args(config), "--log-level", log_level,
           "--parent-pid", str(os.getpid())]
    log.info("starting data plane: %s", " ".join(cmd))
    # a session of its own: Ctrl-C (or a signal to serve's process group) is for serve, which drains its
    # requests and then stops the data plane; were the child in the group, it would die mid-drain
    return subprocess.Popen(cmd, start_new_session=True)  # noqa: S603 - our own interpreter and module


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0, name: str = "data plane") -> int:
    """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code. `name`: what the log calls it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0f s; killing it", name, timeout_s)
            proc.kill()
    return proc.wait()


def spawn_sim_dataplane(endpoint: str, *, model: str, gpu: str, time_scale: float, block_size: int = DEFAULT_BLOCK_SIZE,
                        num_kv_blocks: int | None = None, max_model_len: int | None = None,
                        log_level: str = "WARNING", execution: str = "roofline",
                        decode_partition_sms: str | None = None, piecewise_graphs: bool = True,
                        ) -> subprocess.Popen[bytes]:
    """Start `python -m dataplane.sim_worker`: a simulated GPU that speaks the real protocol."""
    cmd = [sys.executable, "-m", "dataplane.sim_worker", "--endpoint", endpoint, "--model", model, "--gpu", gpu,
           "--time-scale", str(time_scale), "--block-size", str(block_size), "--log-level", log_level,
           "--execution", execution, "--parent-pid", str(os.getpid())]
    if num_kv_blocks is not None:
        cmd += ["--num-kv-blocks", str(num_kv_blocks)]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if decode_partition_sms:
        cmd += ["--decode-partition-sms", decode_partition_sms]
    if not piecewise_graphs:
        cmd.append("--no-piecewise-graphs")
    log.info("starting simulated data plane: %s", " ".join(cmd))
    return subprocess.Popen(cmd, start_new_session=True)  # noqa: S603 - as spawn_dataplane's
