"""Every message that crosses the ZeroMQ socket between the control plane and the data plane.

Two tagged unions, one per direction (`ToWorker`, `ToControl`), decoded by typed decoders in
`shared.codec`. A new field here is an API change between the planes: bump `PROTOCOL_VERSION`.
This module must not import torch or anything of either plane.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

PROTOCOL_VERSION = 10

Mode = Literal["aggregated", "multiplexed"]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How one request picks its next token. temperature 0 means greedy; top_k 0 means off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; 0: the sampled token's; n: plus the top n
    # added to the token's logit before sampling (OpenAI's logit_bias): (token id, bias), ids unique
    logit_bias: tuple[tuple[int, float], ...] = ()
    # when set, only these token ids may be sampled (vLLM's allowed_token_ids)
    allowed_token_ids: tuple[int, ...] = ()
    # None: none; n: the logprob of every prompt token after the first, plus the top n alternatives
    prompt_logprobs: int | None = None
    # while fewer than `min_tokens` tokens are generated, `stop_token_ids` (the request's stop tokens
    # and the model's EOS unless ignored) may not be sampled, as in vLLM
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()


# ---------------------------------------------------------------- control plane -> data plane


class Hello(msgspec.Struct, frozen=True, kw_only=True, tag="hello"):
    """First message on a connection; the worker answers WorkerReady or WorkerFatal."""

    protocol_version: int
    client: str = "controlplane"


class NewRequest(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A sequence the worker has no state for: its whole token list, sent once.

    `token_ids` holds the prompt and, after a preemption, the tokens generated before it;
    `num_prompt_tokens` counts the original prompt so generated-token indices stay stable.
    `num_computed_tokens` leading tokens already have their KV in the first `block_ids` (a prefix
    cache hit: whole blocks, fewer than `token_ids`); the first chunk starts after them.
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    sampling: SamplingParams
    num_computed_tokens: int = 0


class ScheduledSeq(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Work for one sequence in one step: compute its next `num_tokens` uncomputed tokens.

    The worker samples a token when the chunk reaches the end of the sequence's known tokens.
    `new_block_ids` are appended to the sequence's block table before the step runs. `token_mask`
    (structured outputs), when set, says which tokens that sample may take: bit `t % 32` of the
    little-endian 32-bit word `t // 32` for token id `t`, ceil(vocab_size / 32) words; it covers one
    token, so it is only sent on an item that samples, and never on a decode of a look-ahead plan.
    """

    seq_id: int
    num_tokens: int
    new_block_ids: list[int] = []
    token_mask: bytes = b""


class StepPlan(msgspec.Struct, frozen=True, kw_only=True, tag="plan"):
    """One step for the worker. Finished sequences are dropped, new ones registered, then it runs.

    In `multiplexed` mode, prefill items run on `prefill_sms` SMs while decode items run
    `decode_steps` look-ahead steps on `decode_sms` SMs. A decode item is one with `num_tokens == 1`
    whose token is the last known one (it samples); in any mode it runs `decode_steps` steps, each
    feeding its sampled token to the next, so its block table must already hold
    `computed + decode_steps` tokens. Other items run once.

    `masks_follow` (structured outputs): the step's token masks come in a TokenMasks message after
    the plan (they need the tokens of the step before it, still running when the plan is sent); the
    forward pass runs at once and only the sampling waits for them. Such a plan is one aggregated pass
    (`decode_steps` 1) whose entries carry no mask (else each of its sequences fails), and its TokenMasks
    comes before the next plan (else the data plane stops).
    """

    step_id: int
    mode: Mode = "aggregated"
    prefill_sms: int = 0
    decode_sms: int = 0
    decode_steps: int = 1
    new_requests: list[NewRequest] = []
    scheduled: list[ScheduledSeq] = []
    finished_seq_ids: list[int] = []
    trace_context: dict[str, str] = {}
    masks_follow: bool = False


class SeqTokenMask(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One sequence's token mask (`ScheduledSeq.token_mask`'s layout)."""

    seq_id: int
    mask: bytes


class TokenMasks(msgspec.Struct, frozen=True, kw_only=True, tag="masks"):
    """The token masks of step `step_id`, planned with `masks_follow`: its sampling may start. A sequence
    the step samples for that is not listed samples unmasked (the control plane lists every structured
    output still live; a token it no longer wants is dropped when it comes back). A listed mask is checked
    as one in the plan would be; one for a sequence not in the step is ignored."""

    step_id: int
    masks: list[SeqTokenMask] = []


class Shutdown(msgspec.Struct, frozen=True, kw_only=True, tag="shutdown"):
    """Ask the worker to exit cleanly."""

    reason: str = ""


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag="ping"):
    """Are you there? Sent while the control plane is idle; the data plane's loop answers Pong between
    steps (a hung data plane does not)."""

    nonce: int = 0


ToWorker = Union[Hello, StepPlan, TokenMasks, Shutdown, Ping]


# ---------------------------------------------------------------- data plane -> control plane


class ModelDescription(msgspec.Struct, frozen=True, kw_only=True):
    """Shapes the control plane needs for tokenisation limits and its latency model."""

    name: str
    architecture: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: str
    eos_token_ids: list[int] = []
    bos_token_id: int | None = None


class DeviceDescription(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["cpu", "cuda"]
    name: str
    sm_count: int = 0
    memory_bytes: int = 0


class HardwareProfile(msgspec.Struct, frozen=True, kw_only=True):
    """Achievable throughput of the device on `S` SMs, for the control plane's latency model.

    `gemm_flops_per_s[i]` (dense GEMM in the serving dtype) and `hbm_bytes_per_s[i]` (device copy,
    bytes read plus written) hold on `sm_counts[i]` SMs; `sm_counts` is ascending and its last entry
    is the whole device. `source` says where the numbers come from: `measured` at start-up, `cached`
    (measured earlier on this GPU and driver), `declared` (a built-in table), or `scaled` (a declared
    curve rescaled to points measured here). `detail` says which points were measured.
    `step_overhead_ms` is a fixed cost added to every predicted step (launches, host sync).
    """

    gpu: str
    sm_counts: list[int]
    gemm_flops_per_s: list[float]
    hbm_bytes_per_s: list[float]
    source: Literal["measured", "cached", "declared", "scaled"]
    step_overhead_ms: float = 0.0
    driver: str = ""
    detail: str = ""


class WorkerReady(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    """The worker's answer to Hello: what it loaded and how much KV it holds.

    `profile` feeds the latency model (None: no predictions). With `supports_multiplexing`, a
    multiplexed plan may give one phase any SM count in `partition_sm_counts` and the other phase
    the rest of `device.sm_count`.
    """

    protocol_version: int
    model: ModelDescription
    device: DeviceDescription
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    attention_backend: str
    supports_multiplexing: bool = False
    max_num_batched_tokens: int = 0  # the largest step the worker's memory plan fits; 0: no limit
    # the most sequences a step may sample for: the memory plan's logit rows and the decode graphs' buckets
    # are sized for it; 0: no limit
    max_num_seqs: int = 0
    partition_sm_counts: list[int] = []
    profile: HardwareProfile | None = None
    # prefill and mixed passes of up to this many tokens on the whole device replay piecewise CUDA
    # graphs (a shorter host launch); 0: every such pass launches eagerly
    piecewise_max_tokens: int = 0
    # the answering process: a control plane that spawned its data plane checks it talks to that one,
    # not to another data plane already serving the endpoint; 0: not said
    pid: int = 0


class TokenLogprobs(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    logprob: float
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []
    rank: int = 0  # tokens at least as likely, itself included (1: the most likely), as vLLM's; 0: not known


class SeqOutput(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Tokens sampled for one sequence in one step (several with look-ahead decode), and the logprobs
    of the prompt tokens its chunk predicted when they were asked for."""

    seq_id: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    # with SamplingParams.prompt_logprobs: the logprobs of prompt tokens this step's chunk predicts,
    # the first for prompt position `prompt_logprobs_start` (>= 1), the rest in order (token_ids may
    # be empty: a chunk that does not sample)
    prompt_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs_start: int = 0


class SeqFailure(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A request-scoped failure; the worker has dropped the sequence's state."""

    seq_id: int
    message: str


class StepTimings(msgspec.Struct, frozen=True, kw_only=True):
    """Measured durations of one step in milliseconds; `source` says which clock measured them.

    In a multiplexed step `prefill_ms` covers the prefill items and `decode_ms` all look-ahead
    decode steps; 0 means not measured separately. `simulated` times come from a roofline, not a clock.
    """

    total_ms: float
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    source: Literal["host", "cuda_events", "simulated"] = "host"


class StepProgress(msgspec.Struct, frozen=True, kw_only=True, tag="progress"):
    """Tokens of a step that is still running: the look-ahead decode passes that have finished so far
    (sent as each pass's tokens reach the host, so clients see them before the step ends). Only the
    oldest step in flight reports progress; its StepResult then carries only what was not reported."""

    step_id: int
    outputs: list[SeqOutput] = []


class StepResult(msgspec.Struct, frozen=True, kw_only=True, tag="result"):
    """The end of a step: the tokens no StepProgress reported, failures and measured times."""

    step_id: int
    outputs: list[SeqOutput] = []
    failures: list[SeqFailure] = []
    timings: StepTimings = StepTimings(total_ms=0.0)


class WorkerFatal(msgspec.Struct, frozen=True, kw_only=True, tag="fatal"):
    """A process-scoped failure (the worker exits after sending it), or a refused Hello (it keeps serving).
    `retryable`: a Hello refused for now (another control plane is attached), worth saying again."""

    reason: str
    retryable: bool = False


class Pong(msgspec.Struct, frozen=True, kw_only=True, tag="pong"):
    """The answer to a Ping (its nonce); also sent unasked to the attached control plane, which ignores
    it, to learn whether that connection is still open."""

    nonce: int = 0


ToControl = Union[WorkerReady, StepProgress, StepResult, WorkerFatal, Pong]


def fold_progress(progress: list[StepProgress], result: StepResult) -> StepResult:
    """One StepResult holding a step's StepProgress tokens before the result's own, per sequence
    (for a caller that takes a step whole); a sequence's prompt logprobs (one chunk a step) are kept."""
    merged: dict[int, tuple[list[int], list[TokenLogprobs] | None]] = {}
    prompt: dict[int, SeqOutput] = {}  # the output that carried each sequence's prompt logprobs
    for output in [o for p in progress for o in p.outputs] + list(result.outputs):
        tokens, logprobs = merged.setdefault(output.seq_id, ([], [] if output.logprobs is not None else None))
        tokens.extend(output.token_ids)
        if logprobs is not None and output.logprobs is not None:
            logprobs.extend(output.logprobs)
        if output.prompt_logprobs is not None:
            prompt.setdefault(output.seq_id, output)
    outputs = [SeqOutput(seq_id=s, token_ids=t, logprobs=lp,
                         prompt_logprobs=prompt[s].prompt_logprobs if s in prompt else None,
                         prompt_logprobs_start=prompt[s].prompt_logprobs_start if s in prompt else 0)
               for s, (t, lp) in merged.items()]
    return msgspec.structs.replace(result, outputs=outputs)

