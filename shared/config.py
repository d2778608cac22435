"""Frozen configuration of both planes, built once from command-line flags and never mutated.

What is discovered at run time (KV capacity, model shapes, device) travels as a message instead.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from shared.endpoints import check_endpoint

Policy = Literal["aggregated"]
TraceExporter = Literal["none", "console", "otlp", "file"]
MetricsExporter = Literal["none", "otlp"]


class TelemetryConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where spans and metrics go. Both planes get the same trace settings; `none` costs nothing.

    `otlp_endpoint` None means: the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables, else
    the exporter's default (localhost:4317). `file` is an OTLP JSON-lines file (one export per line).
    """

    exporter: TraceExporter = "none"
    otlp_endpoint: str | None = None
    file: str | None = None
    metrics_exporter: MetricsExporter = "none"  # OTLP metrics (Prometheus is `metrics_port`)
    metrics_port: int = 0  # Prometheus text endpoint; 0: off
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.exporter == "file" and not self.file:
            raise ValueError("the file trace exporter needs a file path (--otel-file)")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port out of range: {self.metrics_port}")

    @property
    def tracing(self) -> bool:
        return self.exporter != "none"


Policy = Literal["aggregated", "prefill-first", "static", "duet"]
POLICIES: tuple[str, ...] = ("aggregated", "prefill-first", "static", "duet")
DuetSlo = Literal["tbt", "tpot"]
SchedulingPolicy = Literal["fcfs", "priority"]
SCHEDULING_POLICIES: tuple[str, ...] = ("fcfs", "priority")
DUET_SLOS: tuple[str, ...] = ("tbt", "tpot")


BLAS_LIBRARIES: tuple[str, ...] = ("default", "cublas", "cublaslt")
CUBLAS_WORKSPACE_RE = re.compile(r"(:[0-9]+:[0-9]+)+")  # CUBLAS_WORKSPACE_CONFIG's form (ASCII digits, as torch parses)
PARTITION_KERNELS: tuple[str, ...] = ("device", "partition", "gemm")  # DataplaneConfig.partition_kernels
MAX_DECODE_GEMM_ROWS = 64  # dataplane/kernels/decode_gemm.py's MAX_ROWS
# tokens per KV page of the data plane and of the simulated one: 32 ran decode ~2% faster than 16 on an H100
# (README's H100 section) and passed the GPU suite there
DEFAULT_BLOCK_SIZE = 32


def sm_counts(text: str) -> tuple[int, ...]:
    """`--decode-partition-sms`'s value, "8,16,24": positive SM counts (argparse names the flag when this raises)."""
    counts = tuple(int(x) for x in text.split(","))
    if not counts or min(counts) < 1:
        raise ValueError(text)
    return counts


def _one_of(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")  # --log-level, any case
DEVICE_RE = re.compile(r"auto|cpu(:\d+)?|cuda(:\d+)?")
DTYPES = ("auto", "float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")  # the loader's names
ATTENTION_BACKENDS = ("auto", "torch", "flashinfer")  # dataplane.attention.BACKENDS


class DataplaneConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What the worker loads and how it sizes its KV cache."""

    model: str = "tiny"  # a preset name or a Hugging Face checkpoint folder
    endpoint: str = "ipc:///tmp/duetserve-dataplane.sock"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int | None = None  # None: sized from memory
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_bytes: int = 256 << 20
    max_model_len: int | None = None  # None: the model's own limit
    attention_backend: str = "auto"  # auto | torch | flashinfer
    seed: int = 0
    max_num_batched_tokens: int = 2048  # largest step the memory plan must fit (the scheduler's budget)
    max_num_seqs: int = 256  # largest decode batch with a CUDA graph
    cuda_graphs: bool = True
    # prefill and mixed passes of up to 1024 tokens as CUDA graphs around eager attention
    # (dataplane/piecewise.py), where they can be built (CUDA graphs, flashinfer, the fused path)
    piecewise_graphs: bool = True
    fused_kernels: bool = True  # flashinfer norm/rope and fused projections on CUDA (bf16/fp16)
    # passes of at most this many tokens (decode graphs) fold the norms, SwiGLU and the residual adds
    # into their projections (dataplane/kernels/decode_gemm.py; 0: never, at most 64; bf16 only). Off:
    # slower on an H100 with Triton 3.6's GEMMs (a layer's projections at 16 rows: 208 us, ~182 with
    # the tuned table, against 155 unfolded)
    decode_gemm_rows: int = 0
    # passes of at most this many tokens (decode steps, prefill pieces padded to at most that many, any
    # eager pass that short) run each layer's input and post-attention norms inside the kernels
    # after the projections (the norm weights folded into QKV and gate/up at load, each row's scale applied
    # by the RoPE/KV-write and SwiGLU kernels) and its residual adds inside the O and down GEMMs: 7 kernels a
    # layer instead of 9, before split-K reduces (dataplane/models/fused.py; 0: never; the bf16 fused path
    # with Triton; decode_gemm_rows > 0 takes precedence; with decode_l2_prefetch_kib only down's weights
    # are prefetched). On an H100 every decode point 0.9-2% faster a step (README, lease 11); 256 covers
    # every decode batch up to max_num_seqs' default. The default since the whole GPU suite passed with it
    # (H100, 2026-12-07, with CUDA_CORE_MAX_BATCH 8), as every other default was vouched for
    epilogue_norm_rows: int = 256
    blas_library: str = "default"  # default | cublas | cublaslt: the library torch's GEMMs use on CUDA
    # CUBLAS_WORKSPACE_CONFIG for the data plane's process (":SIZE_KIB:COUNT" pairs), set before its first GEMM
    # (None: the environment's, else cuBLAS's default). ":0:0" gives cuBLAS no workspace, so no split-K and no
    # reduce kernels: decode 0.6-1.3% faster a step on an H100 (lease 11), prefill 8192 76% of GEMM there but
    # 2.3 points lower on lease 6. torch reads the variable once a process: a process that ran a GEMM before
    # the worker loads keeps its first setting
    cublas_workspace_config: str | None = None
    # the library the decode graphs' GEMMs are captured with (default: blas_library's). Meant to run decode
    # without split-K while prefill keeps cuBLAS's workspace; torch 2.11 gives cuBLASLt cuBLAS's workspace
    # unless TORCH_CUBLASLT_UNIFIED_WORKSPACE=0 (then CUBLASLT_WORKSPACE_SIZE, KiB, read once), and on an
    # H100 that setting gained nothing (README, lease 8), so it stays off
    decode_blas_library: str = "default"
    # whole-GPU decode graphs prefetch the first this-many KiB of the QKV, gate/up and down weights into L2
    # on a side stream while the small kernel before each runs (dataplane/kernels/l2_prefetch.py; 0: never). An
    # experiment, off by default: ~1 us a projection at best on an H100, not yet told apart from a lease's
    # drift in the decode grid (README, lease 10; benchmarks/l2_prefetch.py)
    decode_l2_prefetch_kib: int = 0
    multiplexing: bool = True  # build green-context SM partitions on CUDA
    decode_partition_sms: tuple[int, ...] | None = None  # decode sizes to build; None: every allowed split
    # device: kernels on a partition size themselves for the whole GPU; partition: for their partition
    # (cuBLASLt's SM target, FA2 prefill; dataplane/partition_kernels.py); gemm: the SM target only (the
    # prefill keeps FA3). An experiment, off by default.
    partition_kernels: str = "device"
    telemetry: TelemetryConfig = TelemetryConfig()
    health_file: str | None = None  # heartbeat file the serve loop touches (compose health checks)
    calibration_cache_dir: str | None = None  # None: ~/.cache/duetserve (or $DUETSERVE_CACHE_DIR)
    allow_remote: bool = False  # bind a non-loopback tcp:// endpoint (the socket is unauthenticated)

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint, self.allow_remote)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if not 0 <= self.decode_gemm_rows <= MAX_DECODE_GEMM_ROWS:
            raise ValueError(f"decode_gemm_rows must be in [0, {MAX_DECODE_GEMM_ROWS}], got {self.decode_gemm_rows}")
        if self.epilogue_norm_rows < 0:
            raise ValueError(f"epilogue_norm_rows must be >= 0, got {self.epilogue_norm_rows}")
        if self.decode_l2_prefetch_kib < 0:
            raise ValueError(f"decode_l2_prefetch_kib must be >= 0, got {self.decode_l2_prefetch_kib}")
        if self.cublas_workspace_config is not None and not CUBLAS_WORKSPACE_RE.fullmatch(self.cublas_workspace_config):
            raise ValueError("cublas_workspace_config must be ':SIZE_KIB:COUNT' pairs, e.g. ':0:0' or ':4096:8', "
                             f"got {self.cublas_workspace_config!r}")
        for name in ("blas_library", "decode_blas_library"):
            _one_of(name, getattr(self, name), BLAS_LIBRARIES)
        _one_of("partition_kernels", self.partition_kernels, PARTITION_KERNELS)
        # checked here, before the data plane imports torch, not as a handshake's traceback
        if not DEVICE_RE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu or cuda (cuda:N), got {self.device!r}")
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.cpu_kv_cache_bytes < 1:
            raise ValueError(f"cpu_kv_cache_bytes must be >= 1, got {self.cpu_kv_cache_bytes}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Batching limits and the step policy of the control plane's scheduler.

    Policies: `aggregated` (decode-first chunked prefill under the token budget, vLLM-style),
    `prefill-first` (a prefill-only batch whenever prompts wait, SGLang's default), `static`
    (multiplexed on a fixed split whenever prefill and decode work coexist) and `duet` (adaptive:
    aggregated while the mixed batch fits its step budget, else the optimizer's split and look-ahead).
    The duet policy's step budget (`duet_slo`): `tbt` is the paper's rule, every mixed step must fit
    `tbt_slo_ms`; `tpot` lets a mixed step run longer while every running request's time per output
    token stays within `tbt_slo_ms` -- so far, and over its next `tpot_horizon` tokens at the recent
    pace -- which is the per-request TPOT SLO goodput is judged by. The SLOs also define goodput in
    `duetserve simulate`.
    """

    policy: Policy = "duet"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    tbt_slo_ms: float = 50.0  # time between tokens
    ttft_slo_ms: float = 2000.0  # time to first token
    static_decode_sms: int = 32  # static policy: SMs of the decode partition (prefill gets the rest)
    static_lookahead: int = 4  # static policy: decode steps per multiplexed step
    max_lookahead: int = 8  # duet policy: largest k the optimizer considers
    hysteresis: float = 0.05  # duet policy: a new split must beat the current one by this fraction
    duet_slo: DuetSlo = "tpot"  # duet policy: what bounds a mixed step, see above
    tpot_horizon: int = 16  # duet_slo=tpot: future tokens a request's TPOT may count on
    # duet policy: when the mixed batch breaks the step budget, also consider it aggregated with its
    # prefill chunks cut to fit, and take whichever of that and the best split gives more tokens per ms
    duet_trim: bool = True
    # plan step i+1 while step i runs (its sampled tokens stay on the GPU): hides the control
    # plane's and the data plane's host work behind the GPU's
    async_scheduling: bool = True
    # structured outputs under async scheduling: plan a step while the step before it still samples a
    # structured output's token, and send that step's token masks once the token is back (its forward
    # runs meanwhile; only its sampling waits, as vLLM overlaps grammar and forward). Off: while a
    # structured output has a token in flight the steps go one at a time (H100, 64 streams under a
    # regex: 17.1 ms TPOT off, 9.0 ms on, against 8.7 ms with no grammar)
    defer_token_masks: bool = True
    # automatic prefix caching: full KV blocks outlive their requests, and a prompt that starts
    # with cached blocks skips computing them (as vLLM's --enable-prefix-caching, on by default)
    enable_prefix_caching: bool = True
    # the order waiting requests are admitted in, and which running one a preemption takes (vLLM's
    # --scheduling-policy): `fcfs` by arrival, the most recently admitted preempted first; `priority`
    # by each request's priority (lower first), then arrival, the lowest-priority latest-arrived
    # preempted first
    scheduling_policy: SchedulingPolicy = "fcfs"

    def __post_init__(self) -> None:
        _one_of("policy", self.policy, POLICIES)
        _one_of("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:  # as vLLM: else decoders beyond the budget starve
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence needs a token of the step budget")
        if not (self.tbt_slo_ms > 0 and self.ttft_slo_ms > 0):  # written so NaN fails too
            raise ValueError("SLOs must be > 0 ms")
        if self.static_decode_sms < 1 or self.static_lookahead < 1 or self.max_lookahead < 1:
            raise ValueError("static_decode_sms, static_lookahead and max_lookahead must be >= 1")
        if not self.hysteresis >= 0:
            raise ValueError("hysteresis must be >= 0")
        _one_of("duet_slo", self.duet_slo, DUET_SLOS)
        if self.tpot_horizon < 1:
            raise ValueError("tpot_horizon must be >= 1")


class TlsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """PEM files for TLS on the gRPC port; with `client_ca_file` clients must present a certificate it signed."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The gRPC front end and its link to the data plane."""

    host: str = "127.0.0.1"
    port: int = 50051
    dataplane_endpoint: str = "ipc:///tmp/duetserve-dataplane.sock"
    handshake_timeout_s: float = 300.0
    step_timeout_s: float = 120.0
    max_model_len: int | None = None  # cap below the worker's limit
    scheduler: SchedulerConfig = SchedulerConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    # Backpressure: a request beyond these waiting-queue limits gets RESOURCE_EXHAUSTED at once.
    max_queued_requests: int = 1024
    max_queued_tokens: int = 1 << 20  # tokens still to prefill, summed over the waiting requests
    shutdown_grace_s: float = 20.0  # on stop: how long running requests may finish before they are ended
    restart_backoff_s: float = 0.5  # first pause before restarting a spawned data plane (doubles, up to 10 s)
    # Security: the data-plane endpoint must be local unless allowed; optional TLS and bearer token on gRPC.
    allow_remote_dataplane: bool = False
    tls: TlsConfig | None = None
    auth_token: str | None = None  # every RPC but health must carry `authorization: Bearer <token>`
    chat_template: str | None = None  # a file or the template text; default: the model's own
    stream_interval: int = 1  # tokens a streamed message waits for (SGLang's --stream-interval); the first goes at once
    generation_config: str = "auto"  # sampling defaults: auto (the model's generation_config.json), none, a folder
    log_requests: bool = False  # an INFO line per finished request (id, tokens, latencies)
    served_model_name: str | None = None  # the model's name to clients, metrics and spans (None: the model)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        name = self.served_model_name
        if name is not None and (not name.strip() or len(name) > 256 or not name.isprintable()):
            raise ValueError(f"served_model_name must be 1 to 256 printable characters, got {name!r}")
        hosts = {self.host, self.telemetry.metrics_host}
        if self.port and self.port == self.telemetry.metrics_port and (len(hosts) == 1 or hosts & {"0.0.0.0", "::"}):
            raise ValueError(f"the metrics port and the gRPC port are both {self.port}")
        check_endpoint(self.dataplane_endpoint, self.allow_remote_dataplane)
        if self.auth_token is not None and not self.auth_token.strip():  # the server strips what clients send
            raise ValueError("auth_token must not be empty or blank (omit it to serve without authentication)")
        if self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be >= 1")
        if self.max_queued_tokens < 1:
            raise ValueError("max_queued_tokens must be >= 1")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if not (self.shutdown_grace_s >= 0 and self.step_timeout_s > 0 and self.handshake_timeout_s > 0
                and self.restart_backoff_s >= 0):  # written so NaN fails too
            raise ValueError("shutdown_grace_s and restart_backoff_s must be >= 0; step and handshake timeouts > 0")
