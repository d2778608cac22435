"""Scoring the latency predictor on recorded step times: shared by `predictor.py` (which measures
them on a GPU) and `predictor_from_log.py` (which re-scores a results file offline).

A sample is a dict: `sms`, `regime` (decode / prefill / mixed), `batch` x `decode_context`,
`chunks` [(q, c)], `measured_ms`, and optionally `graph` (replayed as a CUDA graph), `mode`
("multiplexed" for a phase on a green-context partition) and `raw_ms` (the plain roofline recorded
at measurement time). Scoring is online: the samples in a shuffled order, each predicted before the
predictor learns from it, as in serving. Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import dataclasses
import random
import statistics

from controlplane.predictor import Predictor, PredictorReport, Regime, StepEstimate
from shared.messages import HardwareProfile
from shared.profiles import H100_DECLARED, ExecutionProfile, declared_profile_for, execution_profile_for
from shared.roofline import ModelShape

KINDS = ("decode", "prefill", "mixed")


def full_sms(samples: list[dict]) -> int:
    return max(s["sms"] for s in samples)


def sample_graph(s: dict, full: int) -> bool:
    """Whether the step replayed a CUDA graph (older files: decode on the whole device only)."""
    return bool(s["graph"]) if "graph" in s else s["regime"] == "decode" and s["sms"] == full


def sample_regime(s: dict) -> Regime:
    """The predictor's regime: a step run on a partition by a multiplexed plan is a mux phase."""
    if s.get("mode") == "multiplexed":
        return "mux_decode" if s["regime"] == "decode" else "mux_prefill"
    return s["regime"]


def sample_estimate(pred: Predictor, s: dict, full: int) -> StepEstimate:
    decode = [s["decode_context"]] * s["batch"]
    cost = pred.cost(decode, [(q, c, True) for q, c in s["chunks"]])
    sms = None if s["sms"] >= full else s["sms"]
    return pred.estimate(cost, sample_regime(s), sms, sample_graph(s, full), with_roofline=True)


def order(samples: list[dict], seed: int) -> list[dict]:
    return random.Random(seed + 1).sample(samples, len(samples))


def score_online(pred: Predictor, samples: list[dict], seed: int) -> PredictorReport:
    """Replay the samples in a shuffled order: predict (corrected), record it, then let it learn."""
    full = full_sms(samples)
    for s in order(samples, seed):
        est = sample_estimate(pred, s, full)
        regime = sample_regime(s)
        s["corrected_ms"] = pred.predict(est, regime)
        pred.observe(regime, est, s["measured_ms"])
    return pred.report()


def score_online_old(pred: Predictor, samples: list[dict], seed: int, recorded_raw: bool) -> PredictorReport:
    """The predictor before the launch model: the plain roofline (recorded, or recomputed) corrected
    by one affine fit per regime (`pred` must use the neutral execution profile, pooled fits only)."""
    full = full_sms(samples)
    for s in order(samples, seed):
        if recorded_raw:
            raw = s["raw_ms"]
        else:
            cost = pred.cost([s["decode_context"]] * s["batch"], [(q, c, True) for q, c in s["chunks"]])
            raw = pred.raw_ms(cost, None if s["sms"] >= full else s["sms"])
        pred.observe(s["regime"], raw, s["measured_ms"])
    return pred.report()


def fitted_mape(samples: list[dict]) -> dict[str, float]:
    """In-sample least-squares fit measured ~ a + b * raw per regime, and its MAPE."""
    out = {}
    for regime in sorted({s["regime"] for s in samples}):
        xs = [s["raw_ms"] for s in samples if s["regime"] == regime]
        ys = [s["measured_ms"] for s in samples if s["regime"] == regime]
        if len(xs) > 1 and statistics.pvariance(xs) > 0:
            b = statistics.covariance(xs, ys) / statistics.variance(xs)
            a = statistics.fmean(ys) - b * statistics.fmean(xs)
        else:
            a, b = 0.0, statistics.fmean(ys) / statistics.fmean(xs)
        out[regime] = statistics.fmean(abs(a + b * x - y) / y for x, y in zip(xs, ys))
    return out


def by_kind(samples: list[dict], field: str = "corrected_ms") -> dict[str, float | None]:
    """MAPE of `field` per batch kind (decode, prefill, mixed; mux phases under their kind)."""
    out: dict[str, float | None] = {}
    for kind in KINDS:
        errs = [abs(s[field] - s["measured_ms"]) / s["measured_ms"] for s in samples if s["regime"] == kind]
        out[kind] = statistics.fmean(errs) if errs else None
    return out


def runs_in_serving(s: dict, full: int, decode_parts: set[int]) -> bool:
    """A shape DuetServe's policies run: anything on the whole GPU, a prefill on a prefill partition
    (the multiplexed prefill phase), a decode replayed as graphs on a decode partition (the decode
    phase). Not: mixed batches, eager decodes or prefills on a decode partition, which the grid
    measures but serving never runs."""
    if s["sms"] >= full:
        return True
    if s["regime"] == "decode":
        return bool(s.get("graph")) and s["sms"] in decode_parts
    return s["regime"] == "prefill" and s["sms"] not in decode_parts


def serving_mape(samples: list[dict]) -> tuple[int, float | None]:
    """(count, MAPE of the scored `corrected_ms`) over the samples that `runs_in_serving`; decode
    partitions are the SM counts where decode ran as graphs on a partition."""
    full = full_sms(samples)
    decode_parts = {s["sms"] for s in samples if s["sms"] < full and s["regime"] == "decode" and s.get("graph")}
    errs = [abs(s["corrected_ms"] - s["measured_ms"]) / s["measured_ms"] for s in samples
            if runs_in_serving(s, full, decode_parts)]
    return len(errs), (statistics.fmean(errs) if errs else None)


def by_kind_and_sms(samples: list[dict]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for s in samples:
        key = f"{s['regime']}{'-graph' if s.get('graph') else ''}@{s['sms']}"
        out.setdefault(key, []).append(abs(s["corrected_ms"] - s["measured_ms"]) / s["measured_ms"])
    return {k: statistics.fmean(v) for k, v in sorted(out.items())}


def shape_of(result: dict) -> ModelShape:
    if "model_shape" in result:
        return ModelShape(**result["model_shape"])
    from dataplane.models.presets import PRESETS  # shapes only: no torch

    cfg = PRESETS[result.get("model", "qwen3-8b")]
    return ModelShape(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                      num_q_heads=cfg.num_q_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                      vocab_size=cfg.vocab_size)


def profile_of(result: dict) -> HardwareProfile:
    p = result.get("profile")
    if not p:
        return declared_profile_for(result.get("device", "")) or H100_DECLARED
    return HardwareProfile(gpu=result.get("device", ""), sm_counts=p["sm_counts"], gemm_flops_per_s=p["gemm_flops_per_s"],
                           hbm_bytes_per_s=p["hbm_bytes_per_s"], source=p.get("source", "measured"),
                           step_overhead_ms=p.get("step_overhead_ms", 0.0))


def execution_of(result: dict) -> ExecutionProfile:
    """The launch model a results file was measured under: its own, or (older files) the declared one
    as it was then -- before mixed steps split their attention (a file without the field predates it)."""
    if "execution_profile" in result:
        return ExecutionProfile(**result["execution_profile"])
    declared = execution_profile_for(result.get("device", "NVIDIA H100 80GB HBM3"),
                                     result.get("attention_backend", "flashinfer"))
    return dataclasses.replace(declared, split_min_decodes=0)


def new_predictor(result: dict) -> Predictor:
    return Predictor(shape_of(result), profile_of(result), execution_of(result),
                     decode_graphs=result.get("attention_backend", "flashinfer") == "flashinfer",
                     piecewise_max_tokens=result.get("piecewise_max_tokens", 0))  # 0: runs before the pieces


def old_predictor(result: dict) -> Predictor:
    return Predictor(shape_of(result), profile_of(result), min_key_samples=1 << 30)  # pooled per regime only
