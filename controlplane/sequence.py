"""One request's state inside the control plane: its tokens, its blocks and where it is in its life.

Only the scheduler mutates a Sequence; the API layer reads finished ones. No tensors, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from shared.messages import SamplingParams, ScheduledSeq, TokenLogprobs

if TYPE_CHECKING:
    from controlplane.structured_output import TokenGrammar


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class StopParams:
    max_tokens: int
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # a stop string that ends the text stays in it


@dataclass(eq=False, slots=True)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: StopParams
    arrival_time: float
    priority: int = 0  # under scheduling_policy="priority": lower is admitted first
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    on_worker: bool = False  # whether the data plane holds state for it
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None  # the stop string or token that ended it
    error: str | None = None
    num_preemptions: int = 0
    # tokens a step already sent will sample for it, not yet known here (steps planned ahead)
    num_inflight: int = 0
    # when its first output token reached the control plane (the scheduler's SLO clock; 0: not yet)
    first_token_at: float = 0.0
    # prompt tokens whose KV its first admission found in the prefix cache (reported in its usage)
    num_cached_tokens: int = 0
    # with sampling.prompt_logprobs: the logprobs of prompt tokens 1, 2, ... received so far ([] at
    # first, set by the scheduler; None: not asked for)
    prompt_logprobs: list[TokenLogprobs] | None = None
    # structured outputs: its grammar's matcher (the tokens it may sample next; fed each token that
    # arrives). Such a sequence never runs ahead: each mask needs every token before it.
    grammar: TokenGrammar | None = None
    # len(prompt_token_ids), which never changes: the scheduler reads these counts for every running
    # sequence on every step, so they are kept cheap
    _num_prompt: int = field(init=False, repr=False, default=0)
    # the prompt plus `stop.max_tokens`: the most tokens it may hold before the model's length cap
    _max_total: int = field(init=False, repr=False, default=0)
    # its plan entry for one token and no new block (most steps of a decode): a frozen message, the
    # same in every such step, so it is built once and not once per step
    _one_token_entry: ScheduledSeq = field(init=False, repr=False, compare=False)
    # the scheduler's limits, fixed when it is added (`set_limits`): the most tokens it may hold
    # (`_max_total`, or the model's length if less) and the token ids that may end it (its stop
    # tokens, and the model's EOS unless ignored) -- what every result checks each new token against
    _token_cap: int = field(init=False, repr=False, default=0)
    _stop_token_ids: frozenset[int] = field(init=False, repr=False, default=frozenset())
    # prefix caching: how many of its leading blocks are in the cache's index (matched at admission
    # or registered since), and the entry id the last of them ends in (0: none) -- reset on release
    _cache_blocks: int = field(init=False, repr=False, default=0)
    _cache_parent: int = field(init=False, repr=False, default=0)
    # prefix caching: leading tokens whose KV a step's result has confirmed in its blocks (a chunk's
    # end, or the cached prefix it was admitted with), and how many tokens it held when admitted
    # (once confirmed that far it decodes, and each output that arrives confirms the KV before it)
    _kv_confirmed: int = field(init=False, repr=False, default=0)
    _admitted_tokens: int = field(init=False, repr=False, default=0)
    # prefix caching: the cache's last `match` of its tokens and the index epoch it was made at (a
    # queue head waiting for free blocks is not matched again while the index stays the same)
    _match: tuple[int, list[int], int] = field(init=False, repr=False, default=(-1, [], 0))
    _prompt_bytes: bytes = field(init=False, repr=False, default=b"")  # its prompt as token_bytes, once

    def __post_init__(self) -> None:
        self._num_prompt = len(self.prompt_token_ids)
        self._max_total = self._num_prompt + self.stop.max_tokens
        self._one_token_entry = ScheduledSeq(seq_id=self.seq_id, num_tokens=1)
        self._token_cap = self._max_total

    def set_limits(self, max_model_len: int, eos_token_ids: frozenset[int]) -> None:
        """Fix the scheduler's limits: its model length and EOS ids (see `_token_cap`)."""
        self._token_cap = min(self._max_total, max_model_len)
        stop = self.stop
        self._stop_token_ids = stop.stop_token_ids if stop.ignore_eos else stop.stop_token_ids | eos_token_ids
        if stop.min_tokens > 0 and self._stop_token_ids:  # the sampler keeps them out until min_tokens
            self.sampling = msgspec.structs.replace(self.sampling, min_tokens=stop.min_tokens,
                                                    stop_token_ids=tuple(sorted(self._stop_token_ids)))

    def forget_blocks(self) -> None:
        """It holds no KV blocks any more (the caller freed them): nothing computed, nothing shared."""
        self.block_ids = []
        self.num_computed_tokens = 0
        self._cache_blocks = self._cache_parent = self._kv_confirmed = self._admitted_tokens = 0

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt

    @property
    def num_tokens(self) -> int:
        """Known tokens plus the ones steps in flight will sample (their KV is computed next)."""
        return self._num_prompt + len(self.output_token_ids) + self.num_inflight

    @property
    def num_outputs(self) -> int:
        """Output tokens, counting the ones in flight."""
        return len(self.output_token_ids) + self.num_inflight

    @property
    def num_uncomputed_tokens(self) -> int:
        return self._num_prompt + len(self.output_token_ids) + self.num_inflight - self.num_computed_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and does not hold them all yet (its prompt must be computed
        whole, asking for them; once held, a recompute after a preemption needs neither)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self._num_prompt - 1

    @property
    def is_decoding(self) -> bool:
        """Every known token but the last is in the KV cache: the next step computes one token."""
        out = len(self.output_token_ids) + self.num_inflight
        return out > 0 and self.num_computed_tokens == self._num_prompt + out - 1

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def stopped_on_token(self) -> bool:
        """It stopped on its last token, an EOS or one of its stop token ids (which counts but adds no
        text unless asked); not on a stop string or a complete structured output."""
        out = self.output_token_ids
        return self.finish_reason is FinishReason.STOP and bool(out) and out[-1] in self._stop_token_ids


def check_token_stop(
    seq: Sequence, token_id: int, eos_token_ids: frozenset[int], max_model_len: int
) -> tuple[FinishReason, str | None] | None:
    """The stop condition the newest output token `token_id` triggers, if any (strings aside)."""
    num_out = len(seq.output_token_ids)
    stop = seq.stop
    if num_out >= stop.min_tokens:
        if not stop.ignore_eos and token_id in eos_token_ids:
            return FinishReason.STOP, None
        if token_id in stop.stop_token_ids:
            return FinishReason.STOP, str(token_id)
    if num_out >= stop.max_tokens or len(seq.prompt_token_ids) + num_out >= max_model_len:
        return FinishReason.LENGTH, None
    return None
