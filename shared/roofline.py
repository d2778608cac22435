"""The attention-aware roofline of DESIGN.md: how long one step takes on S SMs, from shapes alone.

Per layer, over the `n` scheduled tokens: the four projections (QKV, O, gate/up, down) as GEMM
rooflines `max(2 n di do / Pi(S), s (n di + di do + n do) / BW(S))`; the element-wise ops (norms,
RoPE, residual adds, SwiGLU, KV-cache writes) as memory-bound traffic; attention as a *sum of
per-request rooflines* with `F = 4 hq q (q+c) dh + 2 hq q (q+c)`, `B = s (2 hq q dh + 2 hkv (q+c) dh)`.
Times `L` layers, plus the LM head on the sampled rows only, plus the profile's fixed step overhead.
`Pi(S)`, `BW(S)` interpolate the HardwareProfile piecewise-linearly (proportionally below its
smallest point, flat above its largest). That is `Roofline.step_ms`, the paper's model.

`Roofline.device_ms` adds what an `ExecutionProfile` knows about the kernels that run it: a batch
with any non-decode item runs its items through the ragged (prefill) attention kernel, which
pads each request's rows to whole query tiles per query head (a decode item costs a full tile) and,
when it does not fuse a GQA group, reads the KV cache once per query head -- unless it has enough
decode items for the data plane to run them in the decode kernel instead; every kernel costs a
fixed `kernel_us` on the device; a CUDA-graph step pays the host's pre-replay time. The host floor
of an eager step is `Roofline.eager_floor_ms`; how the two combine is the predictor's business.

Shared because the control plane predicts with it and the simulated data plane sleeps by it.
Pure arithmetic: no I/O, no torch, no policy.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

from shared.messages import HardwareProfile, ModelDescription
from shared.profiles import NEUTRAL_EXECUTION, ExecutionProfile

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}


@dataclass(frozen=True)
class ModelShape:
    """The shapes the roofline needs; `bytes_per_elem` is the weight/activation element size."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    bytes_per_elem: int = 2

    @classmethod
    def from_description(cls, m: ModelDescription) -> ModelShape:
        return cls(
            num_layers=m.num_layers, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_q_heads=m.num_q_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
            vocab_size=m.vocab_size, bytes_per_elem=DTYPE_BYTES.get(m.dtype, 2),
        )

    def linear_shapes(self) -> tuple[tuple[int, int], ...]:
        """(d_in, d_out) of each projection in one layer: QKV, O, gate+up, down."""
        d, i, hq, hkv, dh = (self.hidden_size, self.intermediate_size, self.num_q_heads,
                             self.num_kv_heads, self.head_dim)
        return ((d, (hq + 2 * hkv) * dh), (hq * dh, d), (d, 2 * i), (i, d))

    def elementwise_elems_per_token(self) -> int:
        """Elements read + written per token per layer outside GEMMs and attention.

        Two RMSNorms (2 x read+write d), two residual adds (2 x 3d), SwiGLU (read 2I, write I),
        RoPE and q/k norms (2 x read+write of q and k), the KV-cache write (2 hkv dh).
        """
        d, i, hq, hkv, dh = (self.hidden_size, self.intermediate_size, self.num_q_heads,
                             self.num_kv_heads, self.head_dim)
        return 10 * d + 3 * i + 4 * (hq + hkv) * dh + 2 * hkv * dh


def attention_flops_bytes(shape: ModelShape, q: int, c: int) -> tuple[float, float]:
    """DESIGN.md's per-request attention cost for one layer: q new tokens over c cached ones."""
    hq, hkv, dh, s = shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.bytes_per_elem
    kv = q + c
    flops = 4 * hq * q * kv * dh + 2 * hq * q * kv
    nbytes = s * (2 * hq * q * dh + 2 * hkv * kv * dh)
    return float(flops), float(nbytes)


def linear_ms(n: int, d_in: int, d_out: int, s: int, flops_per_s: float, bytes_per_s: float) -> float:
    """One GEMM's roofline time in ms: `max(F / Pi, B / BW)`."""
    flops = 2.0 * n * d_in * d_out
    nbytes = s * (n * d_in + d_in * d_out + n * d_out)
    return max(flops / flops_per_s, nbytes / bytes_per_s) * 1e3


@dataclass
class BatchCost:
    """One batch, reduced to what the roofline needs; cheap to re-evaluate at many SM counts.

    Decode items (one new token on `c` cached ones, so `x = c + 1` keys) are kept as their sorted `c`
    with prefix sums so their summed per-request roofline costs O(log n) per evaluation (the sums
    of `x` follow: prefix + count); other items keep their attention (flops, bytes) each.
    """

    num_tokens: int = 0
    num_sampled: int = 0
    decode_c: list[int] = field(default_factory=list)  # sorted cached tokens of decode items
    decode_prefix: list[int] = field(default_factory=lambda: [0])  # prefix sums of decode_c
    chunks: list[tuple[float, float]] = field(default_factory=list)  # attention (F, B) per other item
    chunk_shapes: list[tuple[int, int]] = field(default_factory=list)  # (q, q + c) per other item

    @property
    def empty(self) -> bool:
        return self.num_tokens == 0

    @property
    def num_seqs(self) -> int:
        return len(self.decode_c) + len(self.chunk_shapes)

    @property
    def ragged(self) -> bool:
        """Whether the step runs the ragged (prefill) attention kernel: any non-decode item."""
        return bool(self.chunk_shapes)

    def merge(self, other: BatchCost) -> BatchCost:
        if other.decode_c and self.decode_c:
            cs = sorted(self.decode_c + other.decode_c)
            prefix = list(accumulate(cs, initial=0))
        else:  # one side has every decode item (a decode part plus a prefill part): share its lists
            cs, prefix = (self.decode_c, self.decode_prefix) if self.decode_c else (other.decode_c, other.decode_prefix)
        return BatchCost(
            num_tokens=self.num_tokens + other.num_tokens, num_sampled=self.num_sampled + other.num_sampled,
            decode_c=cs, decode_prefix=prefix, chunks=self.chunks + other.chunks,
            chunk_shapes=self.chunk_shapes + other.chunk_shapes,
        )


def batch_cost(shape: ModelShape, decode_contexts: list[int], chunks: list[tuple[int, int, bool]]) -> BatchCost:
    """Cost of a batch: decode items by cached length, other items as (q, c, samples)."""
    cs = sorted(decode_contexts)
    attn = [attention_flops_bytes(shape, q, c) for q, c, _ in chunks]
    return BatchCost(
        num_tokens=len(cs) + sum(q for q, _, _ in chunks),
        num_sampled=len(cs) + sum(1 for _, _, samples in chunks if samples),
        decode_c=cs, decode_prefix=list(accumulate(cs, initial=0)), chunks=attn,
        chunk_shapes=[(q, q + c) for q, c, _ in chunks],
    )


def curve_at(sm_counts: list[int], values: list[float], sms: int) -> float:
    """Piecewise-linear interpolation; proportional to S below the first point, flat above the last."""
    if sms <= sm_counts[0]:
        return values[0] * sms / sm_counts[0]
    if sms >= sm_counts[-1]:
        return values[-1]
    i = bisect_left(sm_counts, sms)
    if sm_counts[i] == sms:
        return values[i]
    s0, s1, v0, v1 = sm_counts[i - 1], sm_counts[i], values[i - 1], values[i]
    return v0 + (v1 - v0) * (sms - s0) / (s1 - s0)


class Roofline:
    """Predicted step time (ms) of a BatchCost on S SMs for one model on one profiled device."""

    def __init__(self, shape: ModelShape, profile: HardwareProfile, execution: ExecutionProfile | None = None) -> None:
        n = len(profile.sm_counts)
        if n == 0 or len(profile.gemm_flops_per_s) != n or len(profile.hbm_bytes_per_s) != n:
            raise ValueError("profile curves must be non-empty and of equal length")
        if sorted(profile.sm_counts) != list(profile.sm_counts) or min(profile.sm_counts) < 1:
            raise ValueError("profile sm_counts must be ascending and positive")
        self.shape = shape
        self.profile = profile
        self.execution = execution or NEUTRAL_EXECUTION
        self.full_sms = profile.sm_counts[-1]
        self._curves: dict[int, tuple[float, float]] = {}
        self._dense_coef: dict[tuple[float, float], tuple] = {}  # per curve point: see dense_ms
        self._linears = shape.linear_shapes()
        self._elementwise = shape.bytes_per_elem * shape.elementwise_elems_per_token()
        self._flops_per_token = 2.0 * shape.num_layers * sum(di * do for di, do in self._linears)
        self._head_flops_per_row = 2.0 * shape.hidden_size * shape.vocab_size
        ex, sh = self.execution, shape
        self._kernel_ms = ex.kernels(sh.num_layers) * ex.kernel_us * 1e-3
        self._tile = max(ex.ragged_tile_rows, 1)
        self._ragged_kv_heads = sh.num_kv_heads if ex.ragged_fuses_gqa else sh.num_q_heads
        self.eager_floor_ms = ex.eager_floor_ms(sh.num_layers)
        self.piecewise_floor_ms = ex.piecewise_floor_ms(sh.num_layers)

    def curves(self, sms: int | None = None) -> tuple[float, float]:
        """(Pi, BW) in FLOP/s and bytes/s on `sms` SMs (None: the whole device)."""
        sms = self.full_sms if sms is None else sms
        cached = self._curves.get(sms)
        if cached is None:
            p = self.profile
            cached = (curve_at(p.sm_counts, p.gemm_flops_per_s, sms), curve_at(p.sm_counts, p.hbm_bytes_per_s, sms))
            self._curves[sms] = cached
        return cached

    def step_ms(self, cost: BatchCost, sms: int | None = None) -> float:
        """Roofline time of one step of `cost` on `sms` SMs, including the fixed step overhead."""
        if cost.empty:
            return 0.0
        pi, bw = self.curves(sms)
        layers = self.shape.num_layers * self.attention_ms(cost, pi, bw)
        return self.profile.step_overhead_ms + self.dense_ms(cost, pi, bw) + layers

    def replays_pieces(self, cost: BatchCost, sms: int | None, piecewise_max_tokens: int) -> bool:
        """Whether the data plane replays this prefill or mixed pass as piecewise graphs (host floor
        `piecewise_floor_ms`, not `eager_floor_ms`): on the whole device (a partition's prefill stays
        eager; None or 0 SMs mean the whole device), up to `piecewise_max_tokens` tokens."""
        return (cost.ragged and (sms or self.full_sms) >= self.full_sms
                and cost.num_tokens <= piecewise_max_tokens)

    def device_ms(self, cost: BatchCost, sms: int | None = None, graph: bool = False) -> float:
        """GPU time of one step: the roofline with the kernels' attention tiles, plus the fixed cost of
        every kernel, plus (for a CUDA-graph replay) the host's time before the replay."""
        return self.device_terms(cost, sms, graph)[0]

    def device_terms(self, cost: BatchCost, sms: int | None = None, graph: bool = False) -> tuple[float, float, float]:
        """(`device_ms`, dense compute ms, ragged attention ms): the step's device time and two of its
        terms. Dense compute is the projections' and the LM head's FLOPs at Pi(S) -- work that grows
        with the token count even where the roofline's max() calls a step bound by its weight reads;
        ragged attention is the L layers of the ragged kernel's attention (0 without a chunk)."""
        if cost.empty:
            return 0.0, 0.0, 0.0
        pi, bw = self.curves(sms)
        ragged = cost.ragged
        attention = self.ragged_attention_ms(cost, pi, bw) if ragged else self.attention_ms(cost, pi, bw)
        fixed = self.profile.step_overhead_ms + self._kernel_ms + (self.execution.graph_host_ms if graph else 0.0)
        layers = self.shape.num_layers * attention
        compute = (cost.num_tokens * self._flops_per_token + cost.num_sampled * self._head_flops_per_row) / pi * 1e3
        return fixed + self.dense_ms(cost, pi, bw) + layers, compute, layers if ragged else 0.0

    def dense_ms(self, cost: BatchCost, pi: float, bw: float) -> float:
        """Everything but attention: L layers of projections and element-wise traffic, the LM head on
        the sampled rows, the embedding gather and final norm. A function of the token and sampled
        counts and the curves only: each GEMM's `max(F / Pi, B / BW)` is affine in the rows on
        either side of its crossover, so the coefficients are kept per curve point and a step
        costs a few multiply-adds (the scheduler evaluates it on every candidate SM count)."""
        coef = self._dense_coef.get((pi, bw))
        if coef is None:
            coef = self._dense_coef[(pi, bw)] = self._dense_coefficients(pi, bw)
        linears, per_token, head = coef
        n, m = cost.num_tokens, cost.num_sampled
        layer = 0.0
        for a_f, a_b, c_b in linears:
            f, b = n * a_f, n * a_b + c_b
            layer += f if f > b else b
        out = self.shape.num_layers * layer + n * per_token
        if m:
            a_f, a_b, c_b = head
            f, b = m * a_f, m * a_b + c_b
            out += f if f > b else b
        return out

    def _dense_coefficients(self, pi: float, bw: float) -> tuple[list[tuple[float, float, float]], float,
                                                                  tuple[float, float, float]]:
        """Per GEMM (ms per row as compute, ms per row and fixed ms as traffic), the element-wise and
        model-input traffic per token (all layers), and the LM head's GEMM, at (Pi, BW)."""
        sh = self.shape
        s = sh.bytes_per_elem

        def gemm(di: int, do: int) -> tuple[float, float, float]:
            return 2.0 * di * do / pi * 1e3, s * (di + do) / bw * 1e3, s * di * do / bw * 1e3

        per_token = (sh.num_layers * self._elementwise + s * 4 * sh.hidden_size) / bw * 1e3
        return [gemm(di, do) for di, do in self._linears], per_token, gemm(sh.hidden_size, sh.vocab_size)

    def attention_ms(self, cost: BatchCost, pi: float, bw: float) -> float:
        """One layer's attention: the sum of per-request rooflines."""
        total = sum(max(f / pi, b / bw) for f, b in cost.chunks)
        return (total + self._decode_sum(cost, pi, bw, 1, self.shape.num_kv_heads)) * 1e3

    def ragged_attention_ms(self, cost: BatchCost, pi: float, bw: float) -> float:
        """One layer's attention when every item runs in the ragged kernel: rows padded to whole tiles
        per query head, KV read per `_ragged_kv_heads` heads -- except that a step with at least
        `split_min_decodes` decode items runs those in the decode kernel (one more kernel)."""
        sh, tile = self.shape, self._tile
        hq, dh, s, hkv = sh.num_q_heads, sh.head_dim, sh.bytes_per_elem, self._ragged_kv_heads
        total = 0.0
        for q, kv in cost.chunk_shapes:
            rows = -(-q // tile) * tile
            flops = (4 * dh + 2) * hq * rows * kv
            nbytes = s * (2 * hq * q * dh + 2 * hkv * kv * dh)
            total += max(flops / pi, nbytes / bw)
        split = self.execution.split_min_decodes
        if split and len(cost.decode_c) >= split:
            decode = self._decode_sum(cost, pi, bw, 1, sh.num_kv_heads) + self.execution.kernel_us * 1e-6
        else:
            decode = self._decode_sum(cost, pi, bw, tile, hkv)
        return (total + decode) * 1e3

    def _decode_sum(self, cost: BatchCost, pi: float, bw: float, rows: int, kv_heads: int) -> float:
        """Sum over decode items (x = c + 1 each) of max(a x / pi, (b0 + b1 x) / bw), in seconds, in
        O(log n): items below the crossover x* are memory-bound, those above compute-bound. The
        sorted `c` are searched for `c <= x* - 1` (for integer c the same test as `x <= x*`: x* - 1
        is exact wherever it could matter), and a prefix of `x` sums to the prefix of `c` plus its
        count, so the result is the one sorted `x` would give, to the bit."""
        cs = cost.decode_c
        if not cs:
            return 0.0
        sh = self.shape
        hq, dh, s = sh.num_q_heads, sh.head_dim, sh.bytes_per_elem
        a = hq * (4 * dh + 2) * rows  # flops = a * x
        b0, b1 = s * 2 * hq * dh, s * 2 * kv_heads * dh  # bytes = b0 + b1 * x
        slope = a / pi - b1 / bw
        n = len(cs)
        split = n if slope <= 0 else bisect_right(cs, (b0 / bw) / slope - 1)
        prefix = cost.decode_prefix
        below, total = prefix[split] + split, prefix[-1] + n  # sums of x over the first `split`, over all
        return (b0 * split + b1 * below) / bw + a * (total - below) / pi
