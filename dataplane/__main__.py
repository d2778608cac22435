"""`python -m dataplane`: run the data-plane worker alone (the control plane connects to it)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dataplane.health import clear_stale
from dataplane.lifeline import die_with_parent
from shared.config import BLAS_LIBRARIES, LOG_LEVELS, PARTITION_KERNELS, DataplaneConfig, sm_counts
from shared.endpoints import claim_endpoint
from shared.telemetry_flags import add_trace_flags, telemetry_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataplane", description="DuetServe data plane (GPU worker)")
    d = DataplaneConfig()
    p.add_argument("--model", default=d.model, help="preset name or Hugging Face checkpoint folder")
    p.add_argument("--endpoint", default=d.endpoint, help="ZeroMQ endpoint to bind (ipc:// or tcp://)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=d.dtype, help="auto, float32, bfloat16 or float16")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (default: from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--cpu-kv-cache-bytes", type=int, default=d.cpu_kv_cache_bytes)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--attention-backend", default=d.attention_backend, help="auto, torch or flashinfer")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="largest step (tokens) the GPU memory plan must fit")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="largest decode batch with a CUDA graph")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly")
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=d.piecewise_graphs,
                   help="run prefill and mixed passes of up to 1024 tokens as CUDA graphs around attention "
                        "(--no-piecewise-graphs: launch them eagerly)")
    p.add_argument("--no-fused-kernels", action="store_true", help="use the reference (unfused) model path on CUDA")
    p.add_argument("--decode-gemm-rows", type=int, default=d.decode_gemm_rows,
                   help="passes of at most this many tokens (decode graphs) fold the norms, SwiGLU and the residual "
                        "adds into their projections (0: never; at most 64)")
    p.add_argument("--epilogue-norm-rows", type=int, default=d.epilogue_norm_rows,
                   help="passes of at most this many tokens (decode steps and as short prefills) run the layers' "
                        "norms inside the kernels after QKV and gate/up and the residual adds inside the O and down "
                        "GEMMs (0: never)")
    p.add_argument("--cublas-workspace-config", default=d.cublas_workspace_config,
                   help="CUBLAS_WORKSPACE_CONFIG for this process, set before its first GEMM (':0:0': no workspace, "
                        "so no split-K; default: the environment's)")
    p.add_argument("--blas-library", choices=BLAS_LIBRARIES, default=d.blas_library,
                   help="library for torch's GEMMs on CUDA (default: torch's choice)")
    p.add_argument("--decode-blas-library", choices=BLAS_LIBRARIES, default=d.decode_blas_library,
                   help="library the decode graphs' GEMMs are captured with (default: --blas-library's); cuBLASLt "
                        "shares cuBLAS's workspace unless TORCH_CUBLASLT_UNIFIED_WORKSPACE=0, then sizes it from "
                        "CUBLASLT_WORKSPACE_SIZE (KiB)")
    p.add_argument("--decode-l2-prefetch-kib", type=int, default=d.decode_l2_prefetch_kib,
                   help="whole-GPU decode graphs prefetch the first this-many KiB of the QKV, gate/up and down "
                        "weights into L2 while the small kernel before each runs (0: never; an experiment)")
    p.add_argument("--no-multiplexing", action="store_true", help="build no green-context SM partitions")
    p.add_argument("--decode-partition-sms", type=sm_counts, default=None,
                   help="comma-separated decode partition sizes to build (default: every allowed split)")
    p.add_argument("--partition-kernels", choices=PARTITION_KERNELS, default=d.partition_kernels,
                   help="size a multiplexed step's kernels for the whole GPU (device) or for their partition "
                        "(partition: cuBLASLt SM target, FA2 prefill; gemm: the SM target only; an experiment)")
    p.add_argument("--calibration-cache-dir", default=None,
                   help="where measured hardware profiles are cached (default ~/.cache/duetserve)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    p.add_argument("--health-file", default=None,
                   help="touch this file while serving (read by python -m dataplane.healthcheck)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a tcp:// endpoint that is not loopback (the socket has no authentication: "
                        "use it only on a private network)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process dies (set by the control plane that spawned us)")
    add_trace_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
        # Ctrl-C is for the control plane that spawned us: it drains its requests, then sends Shutdown
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s dataplane: %(message)s")
    try:
        config = DataplaneConfig(
            model=args.model, endpoint=args.endpoint, device=args.device, dtype=args.dtype,
            block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
            gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_bytes=args.cpu_kv_cache_bytes,
            max_model_len=args.max_model_len, attention_backend=args.attention_backend, seed=args.seed,
            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
            cuda_graphs=not args.no_cuda_graphs, piecewise_graphs=args.piecewise_graphs,
            fused_kernels=not args.no_fused_kernels, decode_gemm_rows=args.decode_gemm_rows,
            epilogue_norm_rows=args.epilogue_norm_rows, cublas_workspace_config=args.cublas_workspace_config,
            multiplexing=not args.no_multiplexing, blas_library=args.blas_library,
            decode_blas_library=args.decode_blas_library, decode_l2_prefetch_kib=args.decode_l2_prefetch_kib,
            partition_kernels=args.partition_kernels,
            decode_partition_sms=args.decode_partition_sms,
            calibration_cache_dir=args.calibration_cache_dir,
            telemetry=telemetry_from_args(args), health_file=args.health_file, allow_remote=args.allow_remote,
        )
    except ValueError as exc:
        print(f"python -m dataplane: error: {exc}", file=sys.stderr)
        return 2
    try:  # now, not after a model load of minutes; the claim's descriptor stays open until the process exits
        claim_endpoint(config.endpoint)
    except ValueError as exc:
        print(f"python -m dataplane: error: {exc}", file=sys.stderr)
        return 1
    clear_stale(config.health_file)  # before the load: a previous process's heartbeat would read as ours
    from dataplane.worker import run  # torch is imported only once the flags are valid

    try:
        return run(config)
    except KeyboardInterrupt:  # Ctrl-C while loading (serving handles its signals): no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
