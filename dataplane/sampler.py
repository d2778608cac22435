"""Turn a batch of next-token logits into tokens (and logprobs), one `SamplingParams` per row.

Pipeline per row, in vLLM's order: a structured-output token mask (applied to the logits themselves, as
vLLM applies its grammar bitmask before the sampler: the logprobs are then those of the allowed tokens),
the token rules (only `allowed_token_ids` stay possible,
`logit_bias` is added), then penalties (repetition over prompt+output, presence/frequency over
output), then the stop tokens are masked while fewer than `min_tokens` are generated, then greedy
argmax if temperature is 0, else temperature, min-p, top-k (ties with the k-th kept), top-p and an
exponential race (argmax(p / Exp(1) noise)). A seeded row draws its noise from a generator seeded
by (seed, generated-token index), so it samples the same token alone or in any batch.
Logprobs are those of the raw logits (before any processing but the token mask).
This module must not decide which rows to sample (the worker does) nor keep per-request state beyond
a bounded cache of derived token-rule rows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from shared.messages import SamplingParams, TokenLogprobs

GREEDY_EPS = 1e-5  # temperatures below this are greedy
MAX_LOGIT = 1e30  # a penalised logit's cap: finite after dividing by any temperature >= GREEDY_EPS
_MASK64 = (1 << 64) - 1


@dataclass
class LogprobTensors:
    """Logprobs of the rows that asked for them, still as tensors (device or host)."""

    rows: list[int]
    top_ns: list[int]
    chosen: Tensor  # [W]
    top_vals: Tensor | None  # [W, n]
    top_ids: Tensor | None
    ranks: Tensor | None = None  # [W]: tokens with a logprob >= the chosen one's (vLLM's rank)

    def to_host_async(self) -> LogprobTensors:
        """Start device-to-host copies; read the result only after the stream has passed this point."""
        def host(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)

        return LogprobTensors(self.rows, self.top_ns, host(self.chosen), host(self.top_vals),  # type: ignore[arg-type]
                              host(self.top_ids), host(self.ranks))

    def materialise(self, num_rows: int) -> list[TokenLogprobs | None]:
        out: list[TokenLogprobs | None] = [None] * num_rows
        chosen = self.chosen.tolist()
        vals = self.top_vals.tolist() if self.top_vals is not None else [[] for _ in self.rows]
        ids = self.top_ids.tolist() if self.top_ids is not None else [[] for _ in self.rows]
        ranks = self.ranks.tolist() if self.ranks is not None else [0] * len(self.rows)
        for j, (i, n) in enumerate(zip(self.rows, self.top_ns)):
            out[i] = TokenLogprobs(logprob=chosen[j], top_token_ids=ids[j][:n], top_logprobs=vals[j][:n],
                                   rank=ranks[j])
        return out


@dataclass
class SampleOutput:
    """token_ids: [N] long on the logits' device; logprob tensors for the rows that asked."""

    token_ids: Tensor
    logprob_tensors: LogprobTensors | None = None

    @property
    def logprobs(self) -> list[TokenLogprobs | None]:
        """One entry per row (None if not asked). Reading this waits for the device."""
        n = self.token_ids.shape[0]
        return self.logprob_tensors.materialise(n) if self.logprob_tensors else [None] * n


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, generated_count: int) -> int:
    """The generator seed for the `generated_count`-th token of a request seeded with `seed`."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (generated_count & _MASK64)) >> 1


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _has_token_rules(p: SamplingParams) -> bool:
    return bool(p.logit_bias or p.allowed_token_ids)


PROMPT_LOGPROB_ROWS = 256  # logits rows materialised at a time for prompt logprobs (4 bytes x V each)


def prompt_logprobs(compute_logits: Callable[[Tensor], Tensor], hidden: Tensor, targets: list[int],
                    top_n: int) -> LogprobTensors:
    """Logprobs of `targets` (one per row of `hidden`, the token each row predicts) under the raw
    logits, plus each row's top `top_n`: computed `PROMPT_LOGPROB_ROWS` rows at a time so a long
    chunk never holds all its logits at once. No host sync."""
    n = hidden.shape[0]
    wanted = to_device(targets, torch.long, hidden.device)
    chosen, vals, ids, ranks = [], [], [], []
    for i in range(0, n, PROMPT_LOGPROB_ROWS):
        logp = torch.log_softmax(compute_logits(hidden[i : i + PROMPT_LOGPROB_ROWS]).float(), dim=-1)
        chosen.append(logp.gather(1, wanted[i : i + PROMPT_LOGPROB_ROWS, None]).squeeze(1))
        ranks.append(_ranks(logp, chosen[-1]))
        if top_n > 0:
            v, ix = logp.topk(min(top_n, logp.shape[1]), dim=-1)
            vals.append(v)
            ids.append(ix)
        del logp  # before the next slice's logits: one slice of them alive at a time
    return LogprobTensors(list(range(n)), [top_n] * n, torch.cat(chosen),
                          torch.cat(vals) if vals else None, torch.cat(ids) if ids else None, torch.cat(ranks))


def _ranks(logp: Tensor, chosen: Tensor) -> Tensor:
    """Each row's rank of its chosen token: the tokens whose logprob is at least the chosen one's (1: the
    most likely; ties share the larger rank), as vLLM counts it. On the device, no sync."""
    return (logp >= chosen[:, None]).sum(dim=-1)


class TokenRules:
    """Each request's token rules as one additive logits row [V] on the device: 0 where a token may be
    sampled unchanged, its bias where `logit_bias` has one, -inf outside `allowed_token_ids`. A row is
    built once per request (its params object) and kept while recently used, so a pass costs one
    stack and one index-add however long the lists are; the rows of at most `capacity` requests stay
    (4 bytes x V each)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._rows: OrderedDict[int, tuple[SamplingParams, Tensor]] = OrderedDict()

    def row(self, p: SamplingParams, vocab: int, device: torch.device) -> Tensor:
        key = id(p)
        hit = self._rows.get(key)
        if hit is not None and hit[0] is p and hit[1].shape[0] == vocab and hit[1].device == device:
            self._rows.move_to_end(key)
            return hit[1]
        row = self._build(p, vocab).to(device, non_blocking=True)
        self._rows[key] = (p, row)  # the params are held, so their id is not reused while cached
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return row

    @staticmethod
    def _build(p: SamplingParams, vocab: int) -> Tensor:
        allowed = np.asarray(p.allowed_token_ids, dtype=np.int64)
        biased = np.asarray([t for t, _ in p.logit_bias], dtype=np.int64)
        if (allowed.size and (allowed.min() < 0 or allowed.max() >= vocab)) or (
                biased.size and (biased.min() < 0 or biased.max() >= vocab)):
            raise ValueError(f"a token rule names an id outside the vocabulary (size {vocab})")
        row = np.zeros(vocab, dtype=np.float32)
        if allowed.size:
            row[:] = -np.inf
            row[allowed] = 0.0
        if biased.size:
            row[biased] += np.asarray([v for _, v in p.logit_bias], dtype=np.float32)
        return torch.from_numpy(row)

    def apply(self, logits: Tensor, params: list[SamplingParams]) -> Tensor:
        """`logits` with the rule rows added to the rows that have rules; out of place (the raw logits
        stay for logprobs), and no host sync (the rows' copies are non-blocking)."""
        ruled = [i for i, p in enumerate(params) if _has_token_rules(p)]
        if not ruled:
            return logits
        vocab, device = logits.shape[1], logits.device
        rows = torch.stack([self.row(params[i], vocab, device) for i in ruled])
        return logits.index_add(0, to_device(ruled, torch.long, device), rows)


def _token_counts(tokens: list[Tensor], vocab: int, device: torch.device) -> Tensor:
    """[N, V] float counts of each token id per row (ids outside [0, V) are ignored)."""
    n = len(tokens)
    width = max((int(t.numel()) for t in tokens), default=0)
    padded = torch.full((n, max(width, 1)), vocab, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids = t.reshape(-1).long().cpu()
        padded[i, : ids.numel()] = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
    counts = torch.zeros(n, vocab + 1, device=device)
    counts.scatter_add_(1, padded.to(device, non_blocking=True), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list as a device tensor without a blocking copy (the host side is staged by CUDA)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _mask_stop_tokens(logits: Tensor, rows: list[tuple[int, tuple[int, ...]]]) -> Tensor:
    """`logits` (out of place: the raw logits stay for logprobs) with each row's ids set to -inf."""
    vocab = logits.shape[1]
    pairs = [(i, t) for i, ids in rows for t in ids if 0 <= t < vocab]
    if not pairs:
        return logits
    index = to_device([x for pair in pairs for x in pair], torch.long, logits.device).view(-1, 2)
    return logits.index_put((index[:, 0], index[:, 1]), logits.new_full((), float("-inf")))  # no host copy


def apply_token_masks(logits: Tensor, masks: list[bytes]) -> Tensor:
    """`logits` (out of place) with every token a row's mask leaves out set to -inf; a row with an empty
    mask is unchanged. A mask holds one bit per token id (bit t % 32 of little-endian word t // 32, the
    words of llguidance's and xgrammar's bitmasks), unpacked on the device: one async copy from pinned memory
    (torch's host allocator keeps it until the copy is done), no host sync."""
    rows = [i for i, m in enumerate(masks) if m]
    if not rows:
        return logits
    n, vocab = len(rows), logits.shape[1]
    words = np.frombuffer(b"".join(masks[i] for i in rows), dtype="<i4").reshape(n, -1)
    if words.shape[1] * 32 < vocab:
        raise ValueError(f"a token mask of {words.shape[1] * 32} bits for a vocabulary of {vocab}")
    device = logits.device
    if device.type == "cuda":  # pinned: a pageable copy this large (19 KB a row for Qwen3) may wait for the GPU
        staged = torch.empty(words.shape, dtype=torch.int32, pin_memory=True)
        staged.numpy()[:] = words
        packed = staged.to(device, non_blocking=True)
    else:
        packed = torch.from_numpy(words.copy())
    bits = (packed[:, :, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1
    allowed = bits.reshape(n, -1)[:, :vocab].bool()
    index = to_device(rows, torch.long, device)
    return logits.index_copy(0, index, logits.index_select(0, index).masked_fill(~allowed, float("-inf")))


def _row_tensor(values: list[float], device: torch.device) -> Tensor:
    return to_device(values, torch.float32, device)[:, None]


class Sampler:
    """Stateless apart from one generator for unseeded rows and the token-rule rows it keeps."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.rules = TokenRules()

    def sample(self, logits: Tensor, params: list[SamplingParams], generated_counts: list[int],
               prompt_token_ids: list[Tensor] | None = None,
               output_token_ids: list[Tensor] | None = None,
               inflight_output_ids: Tensor | None = None, token_masks: list[bytes] | None = None) -> SampleOutput:
        """logits: [N, V] float32; one params and one generated count per row. `inflight_output_ids`:
        [N, j] device ids of output tokens sampled by earlier passes of this step (look-ahead), not yet
        in `output_token_ids`; the penalties count them too, on the device. `token_masks`: one per row
        (b"": none), the tokens a structured output allows (`apply_token_masks`); a masked row's grammar
        decides when it may end, so `min_tokens` does not hold its stop tokens back."""
        n = logits.shape[0]
        if len(params) != n or len(generated_counts) != n or (token_masks is not None and len(token_masks) != n):
            raise ValueError(f"{n} logit rows but {len(params)} params, "
                             f"{len(generated_counts)} generated counts"
                             + (f", {len(token_masks)} token masks" if token_masks is not None else ""))
        raw = logits.float()
        if token_masks is not None:
            raw = apply_token_masks(raw, token_masks)
        greedy = [p.temperature < GREEDY_EPS for p in params]
        blocked = [i for i, (p, g) in enumerate(zip(params, generated_counts))
                   if p.stop_token_ids and g < p.min_tokens  # stop tokens held back until min_tokens
                   and not (token_masks is not None and token_masks[i])]
        if all(greedy) and not blocked and not any(has_penalties(p) or _has_token_rules(p) for p in params):
            tokens = raw.argmax(dim=-1)
        else:
            processed = self.rules.apply(raw, params)
            processed = self._apply_penalties(processed, params, prompt_token_ids, output_token_ids,
                                              inflight_output_ids)
            if blocked:
                processed = _mask_stop_tokens(processed, [(i, params[i].stop_token_ids) for i in blocked])
            tokens = self._choose(processed, params, greedy, generated_counts)
        return SampleOutput(token_ids=tokens, logprob_tensors=self._logprobs(raw, tokens, params))

    # ---------------------------------------------------------------- penalties

    def _apply_penalties(self, logits: Tensor, params: list[SamplingParams], prompt_ids: list[Tensor] | None,
                         output_ids: list[Tensor] | None, inflight_ids: Tensor | None = None) -> Tensor:
        if not any(has_penalties(p) for p in params):
            return logits
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        if output_ids is None or (prompt_ids is None and use_rep):
            raise ValueError("penalties need output_token_ids (and prompt_token_ids for "
                             "repetition_penalty)")
        n, vocab = logits.shape
        if len(output_ids) != n or (prompt_ids is not None and len(prompt_ids) != n):
            raise ValueError("prompt_token_ids and output_token_ids need one tensor per row")
        out_counts = _token_counts(output_ids, vocab, logits.device)
        if inflight_ids is not None and inflight_ids.numel():
            if inflight_ids.shape[0] != n:
                raise ValueError(f"inflight_output_ids has {inflight_ids.shape[0]} rows for {n} logit rows")
            ids = inflight_ids.to(logits.device).long()
            out_counts.scatter_add_(1, ids, torch.ones(ids.shape, device=logits.device))
        if use_rep and prompt_ids is not None:
            seen = (_token_counts(prompt_ids, vocab, logits.device) + out_counts) > 0
            rep = _row_tensor([p.repetition_penalty for p in params], logits.device)
            # a tiny penalty divides a logit past float32 (+inf: a NaN softmax, and the race would pick id 0
            # whatever the rules allow): capped, still finite after any temperature's division
            penalised = torch.where(logits > 0, (logits / rep).clamp_max(MAX_LOGIT), logits * rep)
            logits = torch.where(seen, penalised, logits)
        freq = _row_tensor([p.frequency_penalty for p in params], logits.device)
        pres = _row_tensor([p.presence_penalty for p in params], logits.device)
        return logits - freq * out_counts - pres * (out_counts > 0).float()

    # ---------------------------------------------------------------- choosing

    def _choose(self, logits: Tensor, params: list[SamplingParams], greedy: list[bool],
                generated_counts: list[int]) -> Tensor:
        argmax = logits.argmax(dim=-1)
        if all(greedy):
            return argmax
        device = logits.device
        temps = _row_tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device)
        scaled = self._filter(logits / temps, params)
        probs = torch.softmax(scaled, dim=-1)
        noise = self._exponential_noise(probs.shape, params, greedy, generated_counts, device)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = to_device(greedy, torch.bool, device)
        return torch.where(is_greedy, argmax, sampled)

    @staticmethod
    def _filter(logits: Tensor, params: list[SamplingParams]) -> Tensor:
        """Min-p, then top-k (every token tied with the k-th stays), then top-p, as vLLM's V1 sampler;
        removed entries become -inf. The max always survives."""
        n, vocab = logits.shape
        device = logits.device
        if any(p.min_p > 0.0 for p in params):
            probs = torch.softmax(logits, dim=-1)
            min_p = _row_tensor([p.min_p for p in params], device)
            threshold = min_p * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        use_k = any(0 < p.top_k < vocab for p in params)
        use_p = any(p.top_p < 1.0 for p in params)
        if use_k or use_p:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=device)[None, :]
            remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if use_k:
                ks = to_device([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], torch.long, device)
                remove |= sorted_logits < sorted_logits.gather(1, ks[:, None] - 1)  # below the k-th
            if use_p:
                probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
                before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
                top_p = _row_tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device)
                remove |= (before >= top_p) & (ranks > 0)
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        return logits

    def _exponential_noise(self, shape: torch.Size, params: list[SamplingParams], greedy: list[bool],
                           generated_counts: list[int], device: torch.device) -> Tensor:
        """Exp(1) noise per row: seeded rows from their own generator, the rest from ours."""
        noise = torch.empty(shape, device=device)
        seeded = [i for i, (p, g) in enumerate(zip(params, greedy)) if p.seed is not None and not g]
        if len(seeded) < len(params):
            noise.exponential_(generator=self.generator)
        for i in seeded:
            gen = torch.Generator(device=device).manual_seed(row_seed(params[i].seed or 0,
                                                                      generated_counts[i]))
            noise[i].exponential_(generator=gen)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    # ---------------------------------------------------------------- logprobs

    @staticmethod
    def _logprobs(raw: Tensor, tokens: Tensor, params: list[SamplingParams]) -> LogprobTensors | None:
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return None
        rows = to_device(wanted, torch.long, raw.device)
        logp = torch.log_softmax(raw[rows], dim=-1)
        chosen = logp.gather(1, tokens[rows][:, None]).squeeze(1)
        top_n = min(max(params[i].logprobs or 0 for i in wanted), raw.shape[1])
        vals = ids = None
        if top_n > 0:
            vals, ids = logp.topk(top_n, dim=-1)
        return LogprobTensors(wanted, [params[i].logprobs or 0 for i in wanted], chosen, vals, ids,
                              _ranks(logp, chosen))
