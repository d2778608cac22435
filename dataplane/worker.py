"""The data-plane process: load the model, size the KV cache, then serve plans over ZeroMQ.

Receive -> dispatch -> send, with an error boundary: a malformed frame is logged and dropped, a
request-scoped problem travels in the StepResult, anything else sends WorkerFatal and exits.
It executes what the control plane decided and decides nothing itself.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import zmq

from dataplane.attention import AttentionShape, make_backend
from dataplane.calibration import calibrate
from dataplane.health import Heartbeat
from dataplane.kv_cache import allocate_kv_cache
from dataplane.memory import MemoryPlan, plan_cpu_memory, plan_gpu_memory, profile_activations
from dataplane.models.config import ModelConfig
from dataplane.models.loader import load_model, model_config, resolve_dtype
from dataplane.piecewise import PiecewiseGraphs, default_token_buckets, piecewise_possible, piecewise_reserve_bytes
from dataplane.runner import ModelRunner, PendingStep
from dataplane.sampler import Sampler
from dataplane.serve_loop import serve_plans
from dataplane.tracing import DataplaneTracing
from shared.codec import encode
from shared.config import DataplaneConfig
from shared.endpoints import release_ipc
from shared.messages import (
    PROTOCOL_VERSION,
    DeviceDescription,
    Hello,
    ModelDescription,
    Shutdown,
    StepPlan,
    StepProgress,
    ToControl,
    TokenMasks,
    WorkerFatal,
    WorkerReady,
)

if TYPE_CHECKING:
    from dataplane.graphs import DecodeGraphs

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def describe_device(device: torch.device) -> DeviceDescription:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceDescription(
            kind="cuda", name=props.name, sm_count=props.multi_processor_count, memory_bytes=props.total_memory
        )
    return DeviceDescription(kind="cpu", name="cpu", sm_count=0, memory_bytes=0)


def describe_model(cfg: ModelConfig, dtype: torch.dtype) -> ModelDescription:
    return ModelDescription(
        name=cfg.name, architecture=cfg.architecture, vocab_size=cfg.vocab_size, num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_q_heads=cfg.num_q_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        dtype=_DTYPE_NAMES.get(dtype, str(dtype)), eos_token_ids=list(cfg.eos_token_ids),
        bos_token_id=cfg.bos_token_id,
    )


def plan_memory(config: DataplaneConfig, model: torch.nn.Module, cfg: ModelConfig, backend: object,
                dtype: torch.dtype, device: torch.device, piecewise: bool = False) -> MemoryPlan:
    """How many KV blocks fit: the configured number, or what the memory budget leaves."""
    if device.type != "cuda":
        return plan_cpu_memory(cfg, kv_bytes=config.cpu_kv_cache_bytes, block_size=config.block_size, dtype=dtype,
                               num_kv_blocks=config.num_kv_blocks)
    activations = profile_activations(
        model, cfg, backend, num_tokens=config.max_num_batched_tokens,  # type: ignore[arg-type]
        num_logit_rows=config.max_num_seqs, block_size=config.block_size, dtype=dtype, device=device,
    )
    extra = piecewise_reserve_bytes(cfg, config.max_num_batched_tokens, dtype) if piecewise else 0
    return plan_gpu_memory(cfg, utilization=config.gpu_memory_utilization, activation_bytes=activations,
                           block_size=config.block_size, dtype=dtype, device=device,
                           num_kv_blocks=config.num_kv_blocks, extra_reserve_bytes=extra)


@dataclass
class LoadedWorker:
    runner: ModelRunner
    ready: WorkerReady


def apply_cublas_workspace(config: DataplaneConfig) -> None:
    """Set CUBLAS_WORKSPACE_CONFIG for this process when the config names one (before any GEMM: torch reads
    it once a process)."""
    value = config.cublas_workspace_config
    if value is None or os.environ.get("CUBLAS_WORKSPACE_CONFIG") == value:
        return
    if "CUBLAS_WORKSPACE_CONFIG" in os.environ:
        log.warning("cublas_workspace_config %s replaces CUBLAS_WORKSPACE_CONFIG=%s from the environment", value,
                    os.environ["CUBLAS_WORKSPACE_CONFIG"])
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = value


def check_max_model_len(config: DataplaneConfig, cfg: ModelConfig) -> None:
    """Before the weights load: refuse a max_model_len past the model's positions (`cfg`, the model's
    config), as vLLM does (its RoPE table ends there: tokens past it would be computed with no position)."""
    if config.max_model_len is None:
        return
    if config.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {config.max_model_len} is past the model's {cfg.max_position_embeddings} "
                         f"positions (max_position_embeddings); ask for at most that")


def load_worker(config: DataplaneConfig) -> LoadedWorker:
    model_cfg = model_config(config.model)  # read once: the length check and the model's build share it
    check_max_model_len(config, model_cfg)
    apply_cublas_workspace(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    if device.type == "cuda" and config.blas_library != "default":
        torch.backends.cuda.preferred_blas_library(config.blas_library)  # process-wide, before any capture
    model, cfg = load_model(config.model, dtype=dtype, device=device, seed=config.seed, cfg=model_cfg)
    if device.type == "cuda" and config.fused_kernels and dtype != torch.float32:
        if importlib.util.find_spec("flashinfer") is None:  # its norm and RoPE kernels: an image without `gpu`
            log.warning("the fused kernels need flashinfer (pip install 'duetserve[gpu]'): the model runs unfused")
        else:
            from dataplane.models.fused import enable_fused_path

            enable_fused_path(model, device, config.decode_gemm_rows, config.epilogue_norm_rows)
    shape = AttentionShape(cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, dtype)
    backend = make_backend(config.attention_backend, device, shape)
    piecewise = config.piecewise_graphs and piecewise_possible(model, device, backend.name, config.cuda_graphs)
    if config.piecewise_graphs and not piecewise and device.type == "cuda":  # on a CPU every pass is eager
        log.info("piecewise graphs need CUDA graphs, flashinfer and the fused path with Triton; prefill and "
                 "mixed passes stay eager")
    memory = plan_memory(config, model, cfg, backend, dtype, device, piecewise)
    log.info("memory plan: %s", memory.describe() if device.type == "cuda" else f"{memory.num_kv_blocks} KV blocks")
    num_blocks = memory.num_kv_blocks
    kv_caches = allocate_kv_cache(cfg, num_blocks + 1, config.block_size, dtype, device)  # +1: graph padding
    # max_model_len, when given, is at most the model's positions (check_max_model_len)
    max_len = config.max_model_len if config.max_model_len is not None else cfg.max_position_embeddings
    graphs = None
    if device.type == "cuda" and backend.name == "flashinfer" and config.cuda_graphs:
        graphs = capture_decode_graphs(config, model, kv_caches, shape, device, num_blocks, max_len)
    pieces = build_pieces(model, kv_caches, device, config, num_blocks) if piecewise else None
    multiplexer, splits = build_multiplexer(config, device) if graphs is not None else (None, [])
    if multiplexer is not None and multiplexer.fa2_prefill:  # type: ignore[attr-defined]
        with backend.on_partition():  # its wrapper and pinned buffers now, not on the first multiplexed step
            pass
    runner = ModelRunner(
        model, cfg, kv_caches, backend, Sampler(device=device, seed=config.seed),
        block_size=config.block_size, num_blocks=num_blocks, device=device, graphs=graphs,
        multiplexer=multiplexer, pieces=pieces,
    )
    ready = WorkerReady(
        protocol_version=PROTOCOL_VERSION, model=describe_model(cfg, dtype), device=describe_device(device),
        num_kv_blocks=num_blocks, block_size=config.block_size, max_model_len=max_len,
        attention_backend=backend.name, supports_multiplexing=multiplexer is not None,
        partition_sm_counts=[decode for _, decode in splits],
        max_num_batched_tokens=config.max_num_batched_tokens if device.type == "cuda" else 0,
        max_num_seqs=config.max_num_seqs if device.type == "cuda" else 0,
        profile=calibrate(device, dtype, config.calibration_cache_dir, setup=calibration_setup(config),
                          **partition_calibration(multiplexer)),
        piecewise_max_tokens=pieces.max_tokens if pieces is not None else 0,
        pid=os.getpid(),
    )
    return LoadedWorker(runner, ready)


def capture_decode_graphs(config: DataplaneConfig, model: torch.nn.Module, kv_caches: list[torch.Tensor],
                          shape: AttentionShape, device: torch.device, num_blocks: int, max_len: int) -> DecodeGraphs:
    """The whole-GPU decode graphs, one per batch bucket up to `max_num_seqs`, captured now (padding
    rows write to the scratch block `num_blocks`)."""
    from dataplane.graphs import DecodeGraphs, default_buckets

    graphs = DecodeGraphs(
        model, kv_caches, shape, device, block_size=config.block_size,
        max_pages_per_seq=-(-max_len // config.block_size), scratch_block=num_blocks,
        buckets=default_buckets(config.max_num_seqs), blas_library=config.decode_blas_library,
        l2_prefetch_bytes=config.decode_l2_prefetch_kib << 10,
    )
    graphs.capture()
    return graphs


def build_pieces(model: torch.nn.Module, kv_caches: list[torch.Tensor], device: torch.device,
                 config: DataplaneConfig, scratch_block: int) -> PiecewiseGraphs | None:
    """Piecewise graphs of prefill and mixed passes, or None (passes stay eager) when building or
    capturing them fails: they are a speed-up, so a GPU or driver that refuses a capture still serves."""
    try:
        pieces = PiecewiseGraphs(model, kv_caches, device, block_size=config.block_size,  # type: ignore[arg-type]
                                 scratch_block=scratch_block,
                                 buckets=default_token_buckets(config.max_num_batched_tokens))
        pieces.capture()
        return pieces
    except Exception as exc:  # noqa: BLE001 - any failure leaves the eager passes, which work
        log.warning("piecewise graphs could not be captured (%s: %s); prefill and mixed passes stay eager",
                    type(exc).__name__, exc)
    # out of the except block, so its traceback no longer holds the pieces' buffers and graph pool
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except RuntimeError as exc:  # an error the failed capture left pending: the next CUDA call says so
            log.warning("after the failed capture: %s", exc)
        torch.cuda.empty_cache()
    return None


def calibration_setup(config: DataplaneConfig) -> str:
    """The kernel choices a calibration depends on, for its cache key ("" for the defaults)."""
    parts = [f"blas-{config.blas_library}"] if config.blas_library != "default" else []
    workspace = config.cublas_workspace_config or os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace:  # split-K or not changes the GEMM rates measured (the config's, else the environment's)
        parts.append("ws" + workspace.replace(":", "-"))
    if config.decode_blas_library != "default":
        parts.append(f"decode-blas-{config.decode_blas_library}")
    if config.decode_l2_prefetch_kib:
        parts.append(f"l2-prefetch-{config.decode_l2_prefetch_kib}")
    if config.multiplexing and config.partition_kernels != "device":
        parts.append(f"kernels-{config.partition_kernels}")
    return "-".join(parts)


def partition_calibration(multiplexer: object | None) -> dict[str, object]:
    """Let calibration measure every partition size on its own green-context stream, with its GEMMs
    sized for the partition when the multiplexer sizes kernels so."""
    if multiplexer is None:
        return {}
    streams = multiplexer.partitions.streams_by_size()  # type: ignore[attr-defined]

    @contextmanager
    def partition(sms: int) -> Iterator[None]:
        with torch.cuda.stream(streams[sms]), multiplexer.sized(sms):  # type: ignore[attr-defined]
            yield

    return {"sm_counts": sorted(streams), "partition": partition}


def build_multiplexer(config: DataplaneConfig, device: torch.device) -> tuple[object | None, list[tuple[int, int]]]:
    """Green-context partitions for every allowed split (or the configured decode sizes)."""
    if not config.multiplexing:
        return None, []
    from dataplane.multiplex import Multiplexer
    from dataplane.partition_menu import candidate_splits, choose_menu
    from dataplane.partitions import PartitionSet

    props = torch.cuda.get_device_properties(device)
    menu = choose_menu(candidate_splits(props.multi_processor_count, props.major), config.decode_partition_sms)
    try:
        partitions = PartitionSet(device, menu)
    except Exception as exc:  # an old driver or a GPU without green contexts: serve aggregated only
        log.warning("green contexts unavailable, multiplexing off: %s", exc)
        return None, []
    sized = config.partition_kernels != "device"
    fa2 = config.partition_kernels == "partition"
    if sized and config.blas_library != "cublaslt":
        log.warning("partition_kernels=%s with blas_library=%s: only cuBLASLt GEMMs take the SM-count target, "
                    "so this sizes %s", config.partition_kernels, config.blas_library,
                    "the prefill's attention alone" if fa2 else "nothing")
    return (Multiplexer(partitions, sized, props.multi_processor_count, fa2_prefill=fa2),
            partitions.describe())


class Worker:
    """Serves one control plane at a time on a bound ROUTER socket (see serve_loop)."""

    def __init__(
        self, config: DataplaneConfig, loaded: LoadedWorker, tracing: DataplaneTracing | None = None
    ) -> None:
        self.config = config
        self.loaded = loaded
        self.tracing = tracing or DataplaneTracing(None)
        self.heartbeat = Heartbeat(config.health_file)
        self._running = True
        self._pending: deque[tuple[StepPlan, PendingStep, int]] = deque()  # launched, result not sent

    def request_stop(self, *_: object) -> None:
        self._running = False

    def serve(self) -> int:
        try:
            return serve_plans(self.config.endpoint, self._dispatch, lambda: self._running, self.heartbeat.beat,
                               collect=self._collect, busy=self.busy)
        finally:
            self.heartbeat.close()

    def busy(self) -> bool:
        """Steps are running on the device (one waiting for its token masks is not: it waits on the control
        plane, and a silent control plane must not hold the data plane)."""
        return any(not pending.awaiting_masks for _, pending, _ in self._pending)

    def _dispatch(self, message: Hello | StepPlan | TokenMasks | Shutdown) -> ToControl | None:
        if isinstance(message, Hello):
            if message.protocol_version != PROTOCOL_VERSION:
                log.error("refusing control plane with protocol %d", message.protocol_version)
                return WorkerFatal(
                    reason=f"protocol version mismatch: data plane speaks {PROTOCOL_VERSION}, "
                    f"control plane speaks {message.protocol_version}"
                )
            self._pending.clear()  # results for a departed control plane are dropped
            self.loaded.runner.clear()  # a new control plane starts from scratch
            return self.loaded.ready
        if isinstance(message, TokenMasks):
            return self._masks(message)
        if isinstance(message, StepPlan):
            if self._pending and self._pending[-1][1].awaiting_masks:  # its forward needs that step's tokens
                reason = (f"step {message.step_id}'s plan came before the token masks of step "
                          f"{self._pending[-1][0].step_id}")
                log.error("%s", reason)
                return WorkerFatal(reason=reason)
            start = time.time_ns()
            try:
                self._pending.append((message, self.loaded.runner.launch(message), start))
            except Exception as exc:  # noqa: BLE001 - the error boundary of the process
                log.exception("step %d failed", message.step_id)
                return WorkerFatal(reason=f"step {message.step_id} failed: {exc!r}")
            return None
        log.info("shutdown requested: %s", message.reason)
        return None

    def _masks(self, message: TokenMasks) -> ToControl | None:
        """Let the newest step, launched with `masks_follow`, sample under its masks."""
        newest = self._pending[-1] if self._pending else None
        if newest is None or newest[0].step_id != message.step_id or not newest[1].awaiting_masks:
            log.error("dropping token masks for step %d, which awaits none", message.step_id)
            return None
        try:
            self.loaded.runner.apply_masks(newest[1], message)
        except Exception as exc:  # noqa: BLE001 - the error boundary of the process
            log.exception("step %d failed", message.step_id)
            return WorkerFatal(reason=f"step {message.step_id} failed: {exc!r}")
        return None

    def _collect(self) -> list[ToControl]:
        """Results of the launched steps that are done, oldest first, and the oldest running step's
        finished look-ahead passes as a StepProgress (never waits on the GPU)."""
        out: list[ToControl] = []
        while self._pending:
            plan, pending, start = self._pending[0]
            try:
                if not pending.ready():
                    outputs = pending.progress()
                    if outputs:
                        out.append(StepProgress(step_id=plan.step_id, outputs=outputs))
                    return out
                self._pending.popleft()
                result = pending.result()
            except Exception as exc:  # noqa: BLE001 - the error boundary of the process
                log.exception("step %d failed", plan.step_id)
                out.append(WorkerFatal(reason=f"step {plan.step_id} failed: {exc!r}"))
                return out
            self.tracing.record(plan, result, start)
            out.append(result)
        return out


def run(config: DataplaneConfig) -> int:
    try:
        loaded = load_worker(config)
    except Exception as exc:
        if isinstance(exc, (OSError, ValueError)):  # a missing or bad checkpoint, a refused setting: one line
            log.error("data plane failed to start: %s", exc)
            log.debug("start-up failure", exc_info=True)
        else:  # a bug, or the device's: the traceback says where
            log.exception("data plane failed to start")
        _report_fatal(config.endpoint, f"start-up failed: {exc!r}")
        return 1
    worker = Worker(config, loaded, DataplaneTracing.from_config(config.telemetry))
    signal.signal(signal.SIGTERM, worker.request_stop)  # also what the parent's death sends (--parent-pid)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored by a spawned one (see __main__)
        signal.signal(signal.SIGINT, worker.request_stop)
    try:
        return worker.serve()
    finally:
        worker.tracing.shutdown()  # flush spans still batched


def _report_fatal(endpoint: str, reason: str) -> None:
    """Best effort: answer the control plane's Hello with the start-up error, briefly."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    try:
        sock.bind(endpoint)
        if sock.poll(2000):
            sock.recv()
            sock.send(encode(WorkerFatal(reason=reason)))
    except zmq.ZMQError:
        pass
    finally:
        sock.close()
        context.term()
        release_ipc(endpoint)
