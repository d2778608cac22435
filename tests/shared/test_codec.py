"""The inter-plane schema: round trips, typed rejection of bad frames, and a golden schema file."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import msgspec.inspect as mi
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

# The golden file holds a fingerprint of the wire schema built from `msgspec.inspect.type_info`, not
# `msgspec.json.schema` output: the JSON Schema rendering changes between msgspec releases without
# any change on the wire (0.19-0.21 put `null` first in an optional struct's anyOf, 0.23 strips
# docstring indentation from "description"), and CI installs the newest msgspec. The fingerprint
# keeps what encoding and decoding depend on: the union members and their tags, each struct's
# encoding options, and per field its encoded name, type, whether it is required and its default, in
# declaration order; docstrings are left out. It records PROTOCOL_VERSION too, so the version and the
# schema change together.

_STRUCT_OPTIONS = ("tag_field", "tag", "array_like", "forbid_unknown_fields", "omit_defaults")
_NESTED = ("item_type", "key_type", "value_type")  # container attributes rendered as types


class _Fingerprint:
    """The structs reachable from the unions, each rendered once, by name."""

    def __init__(self) -> None:
        self.structs: dict[str, dict[str, object]] = {}
        self.classes: dict[str, type] = {}

    def union(self, union: object) -> dict[str, object]:
        t = mi.type_info(union)
        assert isinstance(t, mi.UnionType) and all(isinstance(m, mi.StructType) for m in t.types)
        tag_fields = {m.tag_field for m in t.types}
        assert len(tag_fields) == 1, f"union members disagree on the tag field: {tag_fields}"
        return {"tag_field": tag_fields.pop(), "tags": {str(m.tag): self.type(m) for m in t.types}}

    def type(self, t: mi.Type) -> str:
        """One type as a string (`list[int]`, `int | none`, `literal['a', 'b']`, a struct's name).
        Constraints (`int(ge=0)`) are the attributes not at their default, so an attribute that a
        later msgspec adds (at its default) changes nothing."""
        if isinstance(t, mi.StructType):
            name = t.cls.__qualname__
            assert self.classes.setdefault(name, t.cls) is t.cls, f"two structs named {name}"
            if name not in self.structs:
                self.structs[name] = {}  # placeholder first: a struct may refer to itself
                self.structs[name] = self.struct(t)
            return name
        if isinstance(t, mi.UnionType):
            return " | ".join(sorted(self.type(m) for m in t.types))
        if isinstance(t, mi.LiteralType):
            return f"literal[{', '.join(sorted(map(repr, t.values)))}]"
        kind = type(t).__name__.removesuffix("Type").lower() or type(t).__name__
        args, options = [], []
        for info in msgspec.structs.fields(t):
            value = getattr(t, info.name)
            if info.name in _NESTED:
                args.append(self.type(value))
            elif isinstance(value, tuple) and value and all(isinstance(v, mi.Type) for v in value):
                args.append(", ".join(self.type(v) for v in value))  # e.g. a tuple's item types
            elif info.name == "cls":
                args.append(f"{value.__module__}.{value.__qualname__}")
            elif value != (None if info.default is msgspec.NODEFAULT else info.default):
                options.append(f"{info.name}={value!r}")
        return kind + (f"[{', '.join(args)}]" if args else "") + (f"({', '.join(options)})" if options else "")

    def struct(self, t: mi.StructType) -> dict[str, object]:
        config = t.cls.__struct_config__
        fields = []
        for f in t.fields:
            field: dict[str, object] = {"name": f.name, "type": self.type(f.type), "required": f.required}
            if f.encode_name != f.name:
                field["encode_name"] = f.encode_name
            if not f.required:  # a factory and a literal default are the same default on the wire
                default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
                field["default"] = msgspec.to_builtins(default)
            fields.append(field)
        return {**{k: getattr(config, k) for k in _STRUCT_OPTIONS}, "fields": fields}


def current_schema() -> dict[str, object]:
    fp = _Fingerprint()
    return {
        "protocol_version": PROTOCOL_VERSION,
        "to_worker": fp.union(ToWorker),
        "to_control": fp.union(ToControl),
        "structs": fp.structs,
    }


def _what_changed(golden: dict[str, object], current: dict[str, object]) -> list[str]:
    """The differences between two fingerprints, one line each (empty: the same schema)."""
    if golden.get("protocol_version") != current.get("protocol_version"):
        return [f"PROTOCOL_VERSION {golden.get('protocol_version')} -> {current.get('protocol_version')}"]
    out = [f"{key}: {golden.get(key)} -> {current.get(key)}" for key in ("to_worker", "to_control")
           if golden.get(key) != current.get(key)]
    old, new = golden.get("structs", {}), current.get("structs", {})
    out += [f"struct {name} removed" for name in sorted(set(old) - set(new))]
    out += [f"struct {name} added: {new[name]}" for name in sorted(set(new) - set(old))]
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        out += [f"{name}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if k != "fields" and a.get(k) != b.get(k)]
        fa, fb = {f["name"]: f for f in a["fields"]}, {f["name"]: f for f in b["fields"]}
        out += [f"{name}.{f} removed" for f in fa if f not in fb]
        out += [f"{name}.{f} added: {fb[f]}" for f in fb if f not in fa]
        out += [f"{name}.{f}: {fa[f]} -> {fb[f]}" for f in fa if f in fb and fa[f] != fb[f]]
        if [f for f in fa if f in fb] != [f for f in fb if f in fa]:
            out.append(f"{name}: field order {list(fa)} -> {list(fb)}")
    return out


def test_schema_matches_golden_file() -> None:
    """A schema change must be deliberate: it is an API change between the planes, so bump
    PROTOCOL_VERSION (shared/messages.py), then regenerate with `python -m tests.shared.test_codec`."""
    golden = json.loads(GOLDEN.read_text())
    current = json.loads(json.dumps(current_schema()))
    changes = _what_changed(golden, current)
    assert not changes, (
        "the inter-plane schema differs from schema.golden.json:\n  " + "\n  ".join(changes))
    assert golden == current  # anything _what_changed does not itemise


def test_schema_still_renders_as_json_schema() -> None:
    """The fingerprint's structs are the ones in msgspec's JSON Schema (whatever shape it has)."""
    structs = current_schema()["structs"]
    defs = {**msgspec.json.schema(ToWorker)["$defs"], **msgspec.json.schema(ToControl)["$defs"]}
    assert set(defs) == set(structs)


def test_round_trips() -> None:
    plan = StepPlan(
        step_id=3, new_requests=[NewRequest(seq_id=1, token_ids=[1, 2], num_prompt_tokens=2, block_ids=[0],
                                            sampling=SamplingParams(temperature=0.5, seed=7, logprobs=2,
                                                                    logit_bias=((5, 1.5),), allowed_token_ids=(1, 5)))],
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
