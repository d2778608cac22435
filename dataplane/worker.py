"""The data-plane process: load the model, size the KV cache, then serve plans over ZeroMQ.

Receive -> dispatch -> send, with an error boundary: a malformed frame is logged and dropped, a
request-scoped problem travels in the StepResult, anything else sends WorkerFatal and exits.
It executes what the control plane decided and decides nothing itself.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass

import torch
import zmq

from dataplane.attention import make_backend
from dataplane.calibration import calibrate
from dataplane.kv_cache import allocate_kv_cache, kv_bytes_per_block
from dataplane.models.config import ModelConfig
from dataplane.models.loader import load_model, resolve_dtype
from dataplane.runner import ModelRunner
from dataplane.sampler import Sampler
from shared.codec import ProtocolError, decode_to_worker, encode
from shared.config import DataplaneConfig
from shared.messages import (
    PROTOCOL_VERSION,
    DeviceDescription,
    Hello,
    ModelDescription,
    Shutdown,
    StepPlan,
    ToControl,
    WorkerFatal,
    WorkerReady,
)

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


def plan_kv_blocks(config: DataplaneConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """How many KV blocks fit: the configured number, or what the memory budget leaves."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_block(cfg, config.block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserve = total * (1.0 - config.gpu_memory_utilization) + (1 << 30)  # headroom for activations
        budget = free - reserve
    else:
        budget = config.cpu_kv_cache_bytes
    blocks = int(budget // per_block)
    if blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache ({budget / 2**20:.0f} MiB budget)")
    return blocks


@dataclass
class LoadedWorker:
    runner: ModelRunner
    ready: WorkerReady


def load_worker(config: DataplaneConfig) -> LoadedWorker:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    model, cfg = load_model(config.model, dtype=dtype, device=device, seed=config.seed)
    num_blocks = plan_kv_blocks(config, cfg, dtype, device)
    kv_caches = allocate_kv_cache(cfg, num_blocks, config.block_size, dtype, device)
    backend = make_backend(config.attention_backend, device)
    runner = ModelRunner(
        model, cfg, kv_caches, backend, Sampler(device=device, seed=config.seed),
        block_size=config.block_size, num_blocks=num_blocks, device=device,
    )
    max_len = cfg.max_position_embeddings
    if config.max_model_len is not None:
        max_len = min(max_len, config.max_model_len)
    ready = WorkerReady(
        protocol_version=PROTOCOL_VERSION, model=describe_model(cfg, dtype), device=describe_device(device),
        num_kv_blocks=num_blocks, block_size=config.block_size, max_model_len=max_len,
        attention_backend=backend.name, supports_multiplexing=False,
        profile=calibrate(device, dtype, config.calibration_cache_dir),
    )
    return LoadedWorker(runner, ready)


class Worker:
    """Serves one control plane at a time on a bound DEALER socket."""

    def __init__(self, config: DataplaneConfig, loaded: LoadedWorker) -> None:
        self.config = config
        self.loaded = loaded
        self._running = True

    def request_stop(self, *_: object) -> None:
        self._running = False

    def serve(self) -> int:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.config.endpoint)
            log.info("data plane listening on %s", self.config.endpoint)
            return self._loop(sock)
        finally:
            sock.close(linger=0)
            context.term()

    def _loop(self, sock: zmq.Socket) -> int:
        while self._running:
            if not sock.poll(100):
                continue
            frame = sock.recv()
            try:
                message = decode_to_worker(frame)
            except ProtocolError as exc:
                log.error("dropping malformed frame: %s", exc)
                continue
            reply = self._dispatch(message)
            if reply is not None:
                try:
                    sock.send(encode(reply), flags=zmq.NOBLOCK)
                except zmq.Again:  # the control plane left mid-step: a blocking send would hang here
                    log.warning("no control plane connected; dropped a %s", type(reply).__name__)
            if isinstance(reply, WorkerFatal) or isinstance(message, Shutdown):
                return 1 if isinstance(reply, WorkerFatal) else 0
        return 0

    def _dispatch(self, message: Hello | StepPlan | Shutdown) -> ToControl | None:
        if isinstance(message, Hello):
            if message.protocol_version != PROTOCOL_VERSION:
                log.error("refusing control plane with protocol %d", message.protocol_version)
                return WorkerFatal(
                    reason=f"protocol version mismatch: data plane speaks {PROTOCOL_VERSION}, "
                    f"control plane speaks {message.protocol_version}"
                )
            self.loaded.runner.seqs.clear()  # a new control plane starts from scratch
            return self.loaded.ready
        if isinstance(message, StepPlan):
            try:
                return self.loaded.runner.execute(message)
            except Exception as exc:  # noqa: BLE001 - the error boundary of the process
                log.exception("step %d failed", message.step_id)
                return WorkerFatal(reason=f"step {message.step_id} failed: {exc!r}")
        log.info("shutdown requested: %s", message.reason)
        return None


def run(config: DataplaneConfig) -> int:
    try:
        loaded = load_worker(config)
    except Exception as exc:
        log.exception("data plane failed to start")
        _report_fatal(config.endpoint, f"start-up failed: {exc!r}")
        return 1
    worker = Worker(config, loaded)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    return worker.serve()


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
