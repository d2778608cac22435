"""The attention-aware roofline of DESIGN.md: how long one step takes on S SMs, from shapes alone.

Per layer, over the `n` scheduled tokens: the four projections (QKV, O, gate/up, down) as GEMM
rooflines `max(2 n di do / Pi(S), s (n di + di do + n do) / BW(S))`; the element-wise ops (norms,
RoPE, residual adds, SwiGLU, KV-cache writes) as memory-bound traffic; attention as a *sum of
per-request rooflines* with `F = 4 hq q (q+c) dh + 2 hq q (q+c)`, `B = s (2 hq q dh + 2 hkv (q+c) dh)`.
Times `L` layers, plus the LM head on the sampled rows only, plus the profile's fixed step overhead.
`Pi(S)`, `BW(S)` interpolate the HardwareProfile piecewise-linearly (proportionally below its
smallest point, flat above its largest).

Shared because the control plane predicts with it and the simulated data plane sleeps by it.
Pure arithmetic: no I/O, no torch, no policy.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

from shared.messages import HardwareProfile, ModelDescription

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

    Decode items (one new token on `c` cached ones) are kept as sorted `x = c + 1` with prefix
    sums so their summed per-request roofline costs O(log n) per evaluation; other items keep
    their attention (flops, bytes) each.
    """

    num_tokens: int = 0
    num_sampled: int = 0
    decode_x: list[int] = field(default_factory=list)  # sorted c + 1 of decode items
    decode_prefix: list[int] = field(default_factory=lambda: [0])
    chunks: list[tuple[float, float]] = field(default_factory=list)  # attention (F, B) per other item

    @property
    def empty(self) -> bool:
        return self.num_tokens == 0

    def merge(self, other: BatchCost) -> BatchCost:
        xs = sorted(self.decode_x + other.decode_x)
        return BatchCost(
            num_tokens=self.num_tokens + other.num_tokens, num_sampled=self.num_sampled + other.num_sampled,
            decode_x=xs, decode_prefix=list(accumulate(xs, initial=0)), chunks=self.chunks + other.chunks,
        )


def batch_cost(shape: ModelShape, decode_contexts: list[int], chunks: list[tuple[int, int, bool]]) -> BatchCost:
    """Cost of a batch: decode items by cached length, other items as (q, c, samples)."""
    xs = sorted(c + 1 for c in decode_contexts)
    attn = [attention_flops_bytes(shape, q, c) for q, c, _ in chunks]
    return BatchCost(
        num_tokens=len(xs) + sum(q for q, _, _ in chunks),
        num_sampled=len(xs) + sum(1 for _, _, samples in chunks if samples),
        decode_x=xs, decode_prefix=list(accumulate(xs, initial=0)), chunks=attn,
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

    def __init__(self, shape: ModelShape, profile: HardwareProfile) -> None:
        n = len(profile.sm_counts)
        if n == 0 or len(profile.gemm_flops_per_s) != n or len(profile.hbm_bytes_per_s) != n:
            raise ValueError("profile curves must be non-empty and of equal length")
        if sorted(profile.sm_counts) != list(profile.sm_counts) or min(profile.sm_counts) < 1:
            raise ValueError("profile sm_counts must be ascending and positive")
        self.shape = shape
        self.profile = profile
        self.full_sms = profile.sm_counts[-1]
        self._curves: dict[int, tuple[float, float]] = {}
        self._linears = shape.linear_shapes()
        self._elementwise = shape.bytes_per_elem * shape.elementwise_elems_per_token()

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
        sh = self.shape
        s, n = sh.bytes_per_elem, cost.num_tokens
        layer = sum(linear_ms(n, di, do, s, pi, bw) for di, do in self._linears)
        layer += n * self._elementwise / bw * 1e3
        layer += self.attention_ms(cost, pi, bw)
        head = linear_ms(cost.num_sampled, sh.hidden_size, sh.vocab_size, s, pi, bw) if cost.num_sampled else 0.0
        model_io = s * n * 4 * sh.hidden_size / bw * 1e3  # embedding gather + final norm
        return self.profile.step_overhead_ms + sh.num_layers * layer + head + model_io

    def attention_ms(self, cost: BatchCost, pi: float, bw: float) -> float:
        """One layer's attention: the sum of per-request rooflines."""
        total = sum(max(f / pi, b / bw) for f, b in cost.chunks)
        xs = cost.decode_x
        if xs:
            sh = self.shape
            hq, hkv, dh, s = sh.num_q_heads, sh.num_kv_heads, sh.head_dim, sh.bytes_per_elem
            a = hq * (4 * dh + 2)  # flops = a * x
            b0, b1 = s * 2 * hq * dh, s * 2 * hkv * dh  # bytes = b0 + b1 * x
            slope = a / pi - b1 / bw
            split = len(xs) if slope <= 0 else bisect_right(xs, (b0 / bw) / slope)
            prefix = cost.decode_prefix
            total += (b0 * split + b1 * prefix[split]) / bw + a * (prefix[-1] - prefix[split]) / pi
        return total * 1e3
