"""The inter-plane schema: round trips, typed rejection of bad frames, and a golden schema file."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.codec import ProtocolError, decode_to_control, decode_to_worker, encode
from shared.messages import (
    PROTOCOL_VERSION,
    DeviceDescription,
    HardwareProfile,
    Hello,
    ModelDescription,
    NewRequest,
    SamplingParams,
    ScheduledSeq,
    SeqOutput,
    StepPlan,
    StepResult,
    ToControl,
    ToWorker,
    TokenLogprobs,
    WorkerFatal,
    WorkerReady,
)

GOLDEN = Path(__file__).with_name("schema.golden.json")


def current_schema() -> dict[str, object]:
    return {
        "protocol_version": PROTOCOL_VERSION,
        "to_worker": msgspec.json.schema(ToWorker),
        "to_control": msgspec.json.schema(ToControl),
    }


def test_schema_matches_golden_file() -> None:
    """A schema change must be deliberate: regenerate with `python -m tests.shared.test_codec`."""
    assert json.loads(GOLDEN.read_text()) == json.loads(json.dumps(current_schema()))


def test_round_trips() -> None:
    plan = StepPlan(
        step_id=3, new_requests=[NewRequest(seq_id=1, token_ids=[1, 2], num_prompt_tokens=2, block_ids=[0],
                                            sampling=SamplingParams(temperature=0.5, seed=7, logprobs=2))],
        scheduled=[ScheduledSeq(seq_id=1, num_tokens=2)], finished_seq_ids=[4], trace_context={"traceparent": "x"},
    )
    assert decode_to_worker(encode(plan)) == plan
    assert decode_to_worker(encode(Hello(protocol_version=PROTOCOL_VERSION))) == Hello(protocol_version=PROTOCOL_VERSION)
    ready = WorkerReady(
        protocol_version=1, num_kv_blocks=10, block_size=16, max_model_len=128, attention_backend="torch",
        model=ModelDescription(name="m", architecture="qwen3", vocab_size=10, num_layers=1, hidden_size=8,
                               intermediate_size=16, num_q_heads=2, num_kv_heads=1, head_dim=4,
                               max_position_embeddings=128, dtype="float32"),
        device=DeviceDescription(kind="cpu", name="cpu"),
    )
    profiled = msgspec.structs.replace(
        ready, supports_multiplexing=True, partition_sm_counts=[8, 16],
        profile=HardwareProfile(gpu="g", sm_counts=[8, 132], gemm_flops_per_s=[1e12, 8e14],
                                hbm_bytes_per_s=[6e11, 3e12], source="declared", step_overhead_ms=0.5),
    )
    result = StepResult(step_id=3, outputs=[SeqOutput(seq_id=1, token_ids=[5],
                                                      logprobs=[TokenLogprobs(logprob=-0.1)])])
    for message in (ready, profiled, result, WorkerFatal(reason="x")):
        assert decode_to_control(encode(message)) == message


def test_wrong_direction_and_garbage_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        decode_to_control(encode(Hello(protocol_version=1)))
    with pytest.raises(ProtocolError):
        decode_to_worker(encode(WorkerFatal(reason="x")))
    with pytest.raises(ProtocolError):
        decode_to_worker(msgspec.msgpack.encode({"type": "plan", "step_id": "not an int"}))


@given(st.binary(max_size=256))
def test_any_bytes_decode_or_raise_protocol_error(frame: bytes) -> None:
    for decode in (decode_to_worker, decode_to_control):
        try:
            decode(frame)
        except ProtocolError:
            pass


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(current_schema(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
