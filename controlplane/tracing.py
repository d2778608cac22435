"""Span names and attributes of the control plane (OpenTelemetry GenAI conventions plus duetserve.*).

Pure helpers: they build attribute dicts and start spans on a tracer they are given. The span tree
lives in `controlplane.observer`; nothing here decides anything about requests.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from shared.messages import SamplingParams, StepPlan, StepResult
from shared.telemetry import extract

OPERATION = "text_completion"
CHAT_OPERATION = "chat"  # a request whose prompt is chat messages
SYSTEM = "duetserve"

REQUEST_SPAN = OPERATION  # named "<operation> <model>", per the GenAI conventions
QUEUE_SPAN = "queue"
PREFILL_SPAN = "prefill_chunk"
DECODE_SPAN = "decode"
STEP_SPAN = "scheduler.step"

# OpenTelemetry's RPC conventions: a server span's status is ERROR only for the codes that say the
# server failed; a client's mistake (INVALID_ARGUMENT, ALREADY_EXISTS, ...), a refusal under load
# (RESOURCE_EXHAUSTED) or the client going away (CANCELLED) leaves it unset. `_OTHER`: a failure with
# no gRPC code (the engine's own).
SERVER_FAULT_CODES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                                "DATA_LOSS", "_OTHER"})


def incoming_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """The W3C trace context of a gRPC call's metadata (`traceparent`, `tracestate`), if any."""
    carrier = {k.lower(): v for k, v in metadata or () if isinstance(v, str) and k.lower() in ("traceparent",
                                                                                               "tracestate")}
    return extract(carrier) if "traceparent" in carrier else None


def start_request_span(tracer: Tracer, model: str, parent: Context | None, start_ns: int) -> Span:
    return tracer.start_span(
        f"{REQUEST_SPAN} {model}", context=parent, kind=SpanKind.SERVER, start_time=start_ns,
        attributes={
            "gen_ai.operation.name": OPERATION,
            "gen_ai.system": SYSTEM,  # older conventions
            "gen_ai.provider.name": SYSTEM,  # current conventions
            "gen_ai.request.model": model,
        },
    )


def end_call_status(span: Span, code: str, message: str | None, rpc: bool) -> None:
    """Record how a call (`rpc`: its server span; else a completion of it) ended: `error.type` for a
    failed one, the status ERROR (with the message) only for a server fault (`SERVER_FAULT_CODES`); a
    client error's message goes to `duetserve.error.message`, as an unset status carries no description.
    The call's own span also gets `rpc.grpc.status_code`."""
    if code != "OK":
        span.set_attribute("error.type", code)
    if rpc and code in grpc.StatusCode.__members__:
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
    if code in SERVER_FAULT_CODES:
        span.set_status(Status(StatusCode.ERROR, message))
    elif message:
        span.set_attribute("duetserve.error.message", message)


def request_attributes(request_id: str, sampling: SamplingParams, max_tokens: int,
                       stop: tuple[str, ...], priority: int = 0, structured: str | None = None) -> dict[str, object]:
    """The request's span attributes (GenAI names where there are some); `structured`: the kind of its
    structured output (json, json_object, regex, choice, grammar, structural_tag), which also sets
    `gen_ai.output.type`."""
    attrs: dict[str, object] = {
        "gen_ai.request.id": request_id,
        "gen_ai.response.id": request_id,
        "gen_ai.request.max_tokens": max_tokens,
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
        "gen_ai.request.top_k": sampling.top_k,
        "gen_ai.request.presence_penalty": sampling.presence_penalty,
        "gen_ai.request.frequency_penalty": sampling.frequency_penalty,
        "duetserve.request.min_p": sampling.min_p,
        "duetserve.request.repetition_penalty": sampling.repetition_penalty,
    }
    if sampling.seed is not None:
        attrs["gen_ai.request.seed"] = sampling.seed
    if stop:
        attrs["gen_ai.request.stop_sequences"] = list(stop)
    if priority:
        attrs["duetserve.request.priority"] = priority
    if structured is not None:
        attrs["duetserve.request.structured_output"] = structured
        attrs["gen_ai.output.type"] = "json" if structured in ("json", "json_object") else "text"
    return attrs


def usage_attributes(finish_reason: str, prompt_tokens: int, completion_tokens: int,
                     cached_tokens: int = 0) -> dict[str, object]:
    """Token usage under both the current and the older GenAI names, the prompt tokens found in the
    prefix cache, and the finish reason."""
    return {
        "duetserve.usage.cached_tokens": cached_tokens,
        "gen_ai.usage.input_tokens": prompt_tokens,
        "gen_ai.usage.output_tokens": completion_tokens,
        "gen_ai.usage.prompt_tokens": prompt_tokens,
        "gen_ai.usage.completion_tokens": completion_tokens,
        "gen_ai.response.finish_reasons": [finish_reason],
    }


def step_plan_attributes(plan: StepPlan, num_running: int, num_waiting: int,
                         predicted_ms: float | None) -> dict[str, object]:
    """The policy decision of one step: mode, SM split, look-ahead k, batch shape, prediction."""
    prefill = sum(s.num_tokens for s in plan.scheduled if s.num_tokens > 1)
    attrs: dict[str, object] = {
        "duetserve.step.id": plan.step_id,
        "duetserve.step.mode": plan.mode,
        "duetserve.step.prefill_sms": plan.prefill_sms,
        "duetserve.step.decode_sms": plan.decode_sms,
        "duetserve.step.decode_steps": plan.decode_steps,
        "duetserve.step.num_scheduled": len(plan.scheduled),
        "duetserve.step.num_new_requests": len(plan.new_requests),
        "duetserve.step.num_finished": len(plan.finished_seq_ids),
        "duetserve.step.prefill_tokens": prefill,
        "duetserve.step.num_tokens": sum(s.num_tokens for s in plan.scheduled),
        "duetserve.scheduler.num_running": num_running,
        "duetserve.scheduler.num_waiting": num_waiting,
    }
    if predicted_ms is not None:
        attrs["duetserve.step.predicted_ms"] = predicted_ms
    if plan.masks_follow:  # structured outputs: its token masks were sent after it (its sampling waited)
        attrs["duetserve.step.masks_follow"] = True
    return attrs


def step_result_attributes(result: StepResult, predicted_ms: float | None) -> dict[str, object]:
    t = result.timings
    attrs: dict[str, object] = {
        "duetserve.step.measured_ms": t.total_ms,
        "duetserve.step.prefill_ms": t.prefill_ms,
        "duetserve.step.decode_ms": t.decode_ms,
        "duetserve.step.timing_source": t.source,
        "duetserve.step.num_failures": len(result.failures),
    }
    if predicted_ms is not None and t.total_ms > 0:
        attrs["duetserve.step.predictor_abs_pct_error"] = abs(predicted_ms - t.total_ms) / t.total_ms * 100.0
    return attrs
