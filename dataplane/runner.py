"""Executes StepPlans: per-sequence state, plan -> tensors -> forward -> sample -> StepResult.

The runner keeps each sequence's tokens, computed count and block table (the physical side of the
control plane's logical bookkeeping). It checks every plan item and reports request-scoped
problems as SeqFailures; it never decides what to schedule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dataplane.attention.base import AttentionBackend, AttentionBatch
from dataplane.models.config import ModelConfig
from dataplane.models.dense import DenseForCausalLM
from dataplane.sampler import Sampler
from shared.messages import (
    NewRequest,
    SamplingParams,
    ScheduledSeq,
    SeqFailure,
    SeqOutput,
    StepPlan,
    StepResult,
    StepTimings,
    TokenLogprobs,
)


class SeqError(ValueError):
    """A plan item this worker cannot run; becomes a SeqFailure for that sequence."""


@dataclass
class SeqState:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int]
    sampling: SamplingParams
    num_computed: int = 0

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class _Item:
    state: SeqState
    num_tokens: int


class ModelRunner:
    def __init__(
        self,
        model: DenseForCausalLM,
        config: ModelConfig,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        sampler: Sampler,
        *,
        block_size: int,
        num_blocks: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.config = config
        self.kv_caches = kv_caches
        self.backend = backend
        self.sampler = sampler
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        self.seqs: dict[int, SeqState] = {}

    # ------------------------------------------------------------------ plan handling

    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        for seq_id in plan.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        failures: list[SeqFailure] = []
        for new in plan.new_requests:
            try:
                self._register(new)
            except SeqError as exc:
                failures.append(SeqFailure(seq_id=new.seq_id, message=str(exc)))
        items: list[_Item] = []
        failed = {f.seq_id for f in failures}
        for entry in plan.scheduled:
            if entry.seq_id in failed:
                continue
            try:
                items.append(self._check(entry, plan.decode_steps))
            except SeqError as exc:
                self.seqs.pop(entry.seq_id, None)
                failures.append(SeqFailure(seq_id=entry.seq_id, message=str(exc)))
        sampled = self._run(items, plan.decode_steps)
        outputs = [SeqOutput(seq_id=sid, token_ids=toks, logprobs=lps) for sid, (toks, lps) in sampled.items()]
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        return StepResult(
            step_id=plan.step_id,
            outputs=outputs,
            failures=failures,
            timings=StepTimings(total_ms=elapsed_ms),
        )

    def _register(self, new: NewRequest) -> None:
        self.seqs.pop(new.seq_id, None)
        if not new.token_ids:
            raise SeqError(f"seq {new.seq_id}: no tokens")
        vocab = self.config.vocab_size
        bad = next((t for t in new.token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise SeqError(f"seq {new.seq_id}: token id {bad} outside the vocabulary (size {vocab})")
        if not 0 < new.num_prompt_tokens <= len(new.token_ids):
            raise SeqError(f"seq {new.seq_id}: num_prompt_tokens {new.num_prompt_tokens} is inconsistent")
        self._check_blocks(new.seq_id, new.block_ids)
        self.seqs[new.seq_id] = SeqState(
            seq_id=new.seq_id,
            token_ids=list(new.token_ids),
            num_prompt_tokens=new.num_prompt_tokens,
            block_table=list(new.block_ids),
            sampling=new.sampling,
        )

    def _check_blocks(self, seq_id: int, blocks: list[int]) -> None:
        bad = next((b for b in blocks if not 0 <= b < self.num_blocks), None)
        if bad is not None:
            raise SeqError(f"seq {seq_id}: block id {bad} outside the KV cache ({self.num_blocks} blocks)")

    def _check(self, entry: ScheduledSeq, decode_steps: int) -> _Item:
        state = self.seqs.get(entry.seq_id)
        if state is None:
            raise SeqError(f"seq {entry.seq_id}: unknown to the data plane")
        self._check_blocks(entry.seq_id, entry.new_block_ids)
        state.block_table.extend(entry.new_block_ids)
        end = state.num_computed + entry.num_tokens
        if entry.num_tokens < 1 or end > len(state.token_ids):
            raise SeqError(
                f"seq {entry.seq_id}: cannot compute {entry.num_tokens} tokens "
                f"({state.num_computed} of {len(state.token_ids)} done)"
            )
        lookahead = decode_steps - 1 if self._is_decode(state, entry.num_tokens) else 0
        if (end + lookahead) > len(state.block_table) * self.block_size:
            raise SeqError(f"seq {entry.seq_id}: {len(state.block_table)} blocks cannot hold {end + lookahead} tokens")
        return _Item(state, entry.num_tokens)

    @staticmethod
    def _is_decode(state: SeqState, num_tokens: int) -> bool:
        return num_tokens == 1 and state.num_computed + 1 == len(state.token_ids)

    # ------------------------------------------------------------------ execution

    def _run(self, items: list[_Item], decode_steps: int) -> dict[int, tuple[list[int], list[TokenLogprobs] | None]]:
        sampled: dict[int, tuple[list[int], list[TokenLogprobs] | None]] = {}
        if not items:
            return sampled
        decoders = [it.state for it in items if self._is_decode(it.state, it.num_tokens)]
        self._forward_and_sample(items, sampled)
        for _ in range(decode_steps - 1):
            live = [s for s in decoders if s.seq_id in self.seqs]
            if not live:
                break
            self._forward_and_sample([_Item(s, 1) for s in live], sampled)
        return sampled

    @torch.inference_mode()
    def _forward_and_sample(
        self, items: list[_Item], sampled: dict[int, tuple[list[int], list[TokenLogprobs] | None]]
    ) -> None:
        batch = AttentionBatch(
            query_lens=[it.num_tokens for it in items],
            context_lens=[it.state.num_computed for it in items],
            block_tables=[it.state.block_table for it in items],
            block_size=self.block_size,
        )
        flat: list[int] = []
        for it in items:
            flat.extend(it.state.token_ids[it.state.num_computed : it.state.num_computed + it.num_tokens])
        input_ids = torch.tensor(flat, dtype=torch.long, device=self.device)
        positions = batch.positions(self.device)
        self.backend.begin_step(batch, self.device)
        hidden = self.model(input_ids, positions, self.backend, self.kv_caches)
        rows: list[int] = []
        samplers: list[SeqState] = []
        for it, end in zip(items, batch.query_start_loc[1:]):
            it.state.num_computed += it.num_tokens
            if it.state.num_computed == len(it.state.token_ids):
                rows.append(end - 1)
                samplers.append(it.state)
        if not rows:
            return
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        self._sample(logits, samplers, sampled)

    def _sample(
        self,
        logits: torch.Tensor,
        states: list[SeqState],
        sampled: dict[int, tuple[list[int], list[TokenLogprobs] | None]],
    ) -> None:
        params = [s.sampling for s in states]
        penalised = any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
        )
        prompt_ids = output_ids = None
        if penalised:
            prompt_ids = [torch.tensor(s.token_ids[: s.num_prompt_tokens], device=self.device) for s in states]
            output_ids = [torch.tensor(s.token_ids[s.num_prompt_tokens :], dtype=torch.long, device=self.device)
                          for s in states]
        result = self.sampler.sample(logits, params, [s.num_generated for s in states], prompt_ids, output_ids)
        tokens = result.token_ids.tolist()
        for state, token, logprob in zip(states, tokens, result.logprobs):
            state.token_ids.append(token)
            toks, lps = sampled.setdefault(state.seq_id, ([], [] if logprob is not None else None))
            toks.append(token)
            if lps is not None and logprob is not None:
                lps.append(logprob)
