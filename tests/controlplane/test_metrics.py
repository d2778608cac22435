"""Prometheus text rendering of the OpenTelemetry instruments, and the predictor-error gauge."""

from __future__ import annotations

from types import SimpleNamespace

from controlplane.metrics import ServingMetrics, prometheus_name
from controlplane.observer import EngineObserver
from shared.config import TelemetryConfig
from shared.messages import StepPlan, StepResult, StepTimings


def metrics() -> ServingMetrics:
    return ServingMetrics(TelemetryConfig(metrics_port=1), "m")  # a reader, but serve() is never called


def test_names_use_the_vllm_style() -> None:
    assert prometheus_name("duetserve.time_to_first_token_seconds") == "duetserve:time_to_first_token_seconds"
    assert prometheus_name("other.name-x") == "other_name_x"


def test_histogram_buckets_are_cumulative_and_counters_get_total() -> None:
    m = metrics()
    for v in (0.0005, 0.003, 0.003, 100.0):
        m.ttft.record(v, m.labels)
    m.request_success.add(2, {**m.labels, "finished_reason": "stop"})
    text = m.render_prometheus()
    assert "# TYPE duetserve:time_to_first_token_seconds histogram" in text
    assert 'duetserve:time_to_first_token_seconds_bucket{model_name="m",le="0.001"} 1' in text
    assert 'duetserve:time_to_first_token_seconds_bucket{model_name="m",le="0.005"} 3' in text
    assert 'duetserve:time_to_first_token_seconds_bucket{model_name="m",le="+Inf"} 4' in text
    assert 'duetserve:time_to_first_token_seconds_count{model_name="m"} 4' in text
    assert 'duetserve:request_success_total{finished_reason="stop",model_name="m"} 2' in text
    m.shutdown()


def test_predictor_error_comes_from_the_schedulers_prediction() -> None:
    m = metrics()
    observer = EngineObserver(None, m, "m")
    allocator = SimpleNamespace(num_blocks=10, num_free=4)
    scheduler = SimpleNamespace(seqs={}, num_preemptions=0, num_running=2, num_waiting=1, allocator=allocator,
                                last_predicted_ms=12.0)
    plan = StepPlan(step_id=0, mode="multiplexed", prefill_sms=96, decode_sms=36, decode_steps=4)
    assert observer.step_planned(plan, scheduler, 0) is plan  # no tracer: the plan goes out untouched
    observer.step_done(plan, StepResult(step_id=0, timings=StepTimings(total_ms=10.0)), scheduler)
    text = m.render_prometheus()
    assert 'duetserve:predictor_abs_pct_error{model_name="m"} 20.0' in text
    assert 'duetserve:sm_split_prefill{model_name="m"} 96' in text
    assert 'duetserve:kv_cache_usage_perc{model_name="m"} 0.6' in text
    assert 'duetserve:num_requests_waiting{model_name="m"} 1' in text
    observer.shutdown()


def test_steps_are_counted_by_mode_with_their_time_and_tokens() -> None:
    from shared.messages import ScheduledSeq

    m = metrics()
    observer = EngineObserver(None, m, "m")
    scheduler = SimpleNamespace(seqs={}, num_preemptions=0, num_running=2, num_waiting=0)
    mux = StepPlan(step_id=0, mode="multiplexed", prefill_sms=96, decode_sms=36, decode_steps=2,
                   scheduled=[ScheduledSeq(seq_id=1, num_tokens=1), ScheduledSeq(seq_id=2, num_tokens=300)])
    agg = StepPlan(step_id=1, scheduled=[ScheduledSeq(seq_id=1, num_tokens=1), ScheduledSeq(seq_id=3, num_tokens=7)])
    observer.step_planned(mux, scheduler, 0)
    observer.step_done(mux, StepResult(step_id=0, timings=StepTimings(total_ms=30.0, prefill_ms=28.0,
                                                                        decode_ms=24.0)), scheduler)
    for plan, ms in ((agg, 9.5), (agg, 10.5)):
        observer.step_planned(plan, scheduler, 0)
        observer.step_done(plan, StepResult(step_id=plan.step_id, timings=StepTimings(total_ms=ms)), scheduler)
    text = m.render_prometheus()
    assert 'duetserve:steps_total{mode="multiplexed",model_name="m"} 1' in text
    assert 'duetserve:steps_total{mode="aggregated",model_name="m"} 2' in text
    assert 'duetserve:step_tokens_total{mode="multiplexed",model_name="m"} 301' in text
    assert 'duetserve:step_tokens_total{mode="aggregated",model_name="m"} 16' in text
    assert 'duetserve:step_time_milliseconds_total{mode="aggregated",model_name="m",phase="total"} 20.0' in text
    assert 'duetserve:step_time_milliseconds_total{mode="multiplexed",model_name="m",phase="decode"} 24.0' in text
    assert 'duetserve:step_time_milliseconds_total{mode="multiplexed",model_name="m",phase="prefill"} 28.0' in text
    assert not [line for line in text.splitlines() if 'mode="aggregated"' in line and 'phase="prefill"' in line]
    observer.shutdown()


def test_event_counters_are_exported_at_zero_before_their_first_event() -> None:
    text = metrics().render_prometheus()
    for name in ("num_preemptions", "prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits"):
        assert f'duetserve:{name}_total{{model_name="m"}} 0' in text, name
