"""Structured outputs on the control plane: grammars compiled against the vocabulary (byte-level and a real
BPE tokenizer.json), their bitmasks in the data plane's layout, the request checks, and the scheduler's
part against the simulated data plane (which honours masks): a structured sequence never runs ahead,
its step looks no step ahead, every token it gets is its grammar's, it ends when the grammar is complete,
and a token the grammar refuses fails it alone."""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import deque
from pathlib import Path

import msgspec
import numpy as np
import pytest

from controlplane.kv_blocks import BlockAllocator
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.scheduler import Scheduler
from controlplane.sequence import FinishReason, Sequence, StopParams
from controlplane.structured_output import (
    GrammarCompiler, GrammarError, GrammarSpec, GrammarUnavailable, next_token_masks,
)
from controlplane.tokenizer import ByteTokenizer, HFTokenizer
from controlplane.validation import InvalidRequest, Limits, check_fields, validate_generate
from dataplane.seq_state import mask_bytes
from dataplane.sim import SimRunner
from shared.config import SchedulerConfig
from shared.messages import SamplingParams, StepPlan, StepResult, TokenMasks
from tests.controlplane.test_async_scheduling import LookaheadPolicy
from tests.factories import write_tokenizer

VOCAB = 1000  # ids 0-255 bytes, the rest special (ByteTokenizer)
EOS = 257


def allowed(mask: bytes, vocab: int = VOCAB) -> list[int]:
    return np.flatnonzero(np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[:vocab]).tolist()


@pytest.fixture(scope="module")
def byte_grammars() -> GrammarCompiler:
    return GrammarCompiler(ByteTokenizer(), VOCAB, [EOS])


def test_a_regex_allows_its_bytes_then_only_the_end(byte_grammars: GrammarCompiler) -> None:
    grammar = byte_grammars.compile(GrammarSpec("regex", "[0-9]{2}")).new_matcher()
    mask = grammar.mask()
    assert len(mask) == mask_bytes(VOCAB) and allowed(mask) == list(range(48, 58))
    assert grammar.accept(ord("4")) is None and not grammar.done
    assert grammar.accept(ord("x")) is not None  # refused: the matcher is broken from here on
    fresh = byte_grammars.compile(GrammarSpec("regex", "[0-9]{2}")).new_matcher()
    assert fresh.accept(ord("4")) is None and fresh.accept(ord("2")) is None
    assert fresh.done and allowed(fresh.mask()) == [EOS]


def test_each_completion_gets_its_own_matcher(byte_grammars: GrammarCompiler) -> None:
    compiled = byte_grammars.compile(GrammarSpec("choice", json.dumps(["yes", "no"])))
    a, b = compiled.new_matcher(), compiled.new_matcher()
    assert a.accept(ord("y")) is None
    assert allowed(a.mask()) == [ord("e")] and allowed(b.mask()) == [ord("n"), ord("y")]


def test_json_schema_and_json_object(byte_grammars: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    tight = byte_grammars.compile(GrammarSpec("json", json.dumps(schema), disable_any_whitespace=True)).new_matcher()
    for byte in b'{"ok":true}':
        assert tight.accept(byte) is None
    assert tight.done
    loose = byte_grammars.compile(GrammarSpec("json", json.dumps(schema))).new_matcher()
    assert loose.accept(ord("{")) is None and ord(" ") in allowed(loose.mask())  # whitespace allowed by default
    assert ord(" ") not in allowed(tight_start(byte_grammars, schema))
    anything = byte_grammars.compile(GrammarSpec("json_object")).new_matcher()
    assert allowed(anything.mask())[0] == ord("{") or ord("{") in allowed(anything.mask())
    assert ord("[") not in allowed(anything.mask())


def tight_start(grammars: GrammarCompiler, schema: dict) -> bytes:
    matcher = grammars.compile(GrammarSpec("json", json.dumps(schema), disable_any_whitespace=True)).new_matcher()
    assert matcher.accept(ord("{")) is None
    return matcher.mask()


def test_the_schema_true_allows_any_json_value(byte_grammars: GrammarCompiler) -> None:
    grammar = byte_grammars.compile(GrammarSpec("json", "true", disable_any_whitespace=True)).new_matcher()
    assert {ord(c) for c in '{["0-tfn'} <= set(allowed(grammar.mask()))


def test_a_structural_tag_leaves_text_free_until_a_trigger(byte_grammars: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    tag = {"type": "structural_tag", "triggers": ["<fn"],
           "structures": [{"begin": "<fn=add>", "schema": schema, "end": "</fn>"}]}
    m = byte_grammars.compile(GrammarSpec("structural_tag", json.dumps(tag))).new_matcher()
    free = allowed(m.mask())
    assert {ord("h"), ord("<"), ord(" "), EOS} <= set(free)
    steps = [(b"hi <fn", [ord("=")]), (b"=add>", [ord("{")]), (b'{"a":12}', [ord("<")]), (b"</fn> ok", free)]
    for text, then in steps:
        for byte in text:
            assert m.accept(byte) is None, (text, byte)
        assert allowed(m.mask()) == then, text
    for byte in b" <fx <f":  # "<f" is no trigger yet
        assert m.accept(byte) is None
    assert m.accept(ord("n")) is None and m.accept(ord("x")) is not None  # "<fn" is: "=add>" must follow


def test_a_structural_tag_takes_a_schema_as_text_and_can_forbid_free_whitespace(
        byte_grammars: GrammarCompiler) -> None:
    tag = {"structures": [{"begin": "<fn=a>", "schema": json.dumps({"type": "object"}), "end": "</fn>"}],
           "triggers": ["<fn"]}
    for tight in (False, True):
        m = byte_grammars.compile(GrammarSpec("structural_tag", json.dumps(tag), tight)).new_matcher()
        for byte in b"<fn=a>{":
            assert m.accept(byte) is None
        assert (ord(" ") in allowed(m.mask())) is not tight and (ord("\n") in allowed(m.mask())) is not tight
        assert ord('"') in allowed(m.mask()) and ord("}") in allowed(m.mask())


@pytest.mark.parametrize("tag, says", [
    (json.dumps({"structures": [{"begin": "<a", "end": ""}], "triggers": [f"<{i}" for i in range(1025)]}),
     "at most 1024 triggers and 1024 structures, got 1025 and 1"),
    (json.dumps({"structures": [{"begin": "<a", "schema": "{x", "end": ""}], "triggers": ["<a"]}),
     r"structures\[0\].schema: not a JSON schema"),
    ("[1]", 'structural_tag: an object {"structures"'),
    ('{"structures": [], "triggers": ["<a"]}', "structural_tag.structures: a list of one or more"),
    ('{"structures": [{"begin": "<a>", "end": ""}], "triggers": [""]}', "structural_tag.triggers: a list"),
    ('{"structures": [{"begin": "<a>", "end": 3}], "triggers": ["<a"]}', r"structures\[0\]: an object with strings"),
    ('{"structures": [{"begin": "<a>", "end": "", "schema": 3}], "triggers": ["<a"]}', "schema: a JSON schema is"),
    ('{"structures": [{"begin": "<a>", "end": ""}], "triggers": ["<b"]}', "starts with none of the triggers"),
])
def test_a_bad_structural_tag_says_why(byte_grammars: GrammarCompiler, tag: str, says: str) -> None:
    with pytest.raises(GrammarError, match=says):
        byte_grammars.compile(GrammarSpec("structural_tag", tag))


def test_a_whitespace_pattern_is_the_json_whitespace(byte_grammars: GrammarCompiler) -> None:
    array = json.dumps({"type": "array", "items": {"type": "integer"}})
    m = byte_grammars.compile(GrammarSpec("json", array, whitespace_pattern="[ ]?")).new_matcher()
    assert m.accept(ord("[")) is None
    assert allowed(m.mask()) == sorted(map(ord, " -0123456789]"))
    assert m.accept(ord(" ")) is None and ord(" ") not in allowed(m.mask())  # one space at most
    with pytest.raises(GrammarError, match="(?s)^whitespace_pattern: .*unclosed group"):
        byte_grammars.compile(GrammarSpec("json_object", whitespace_pattern="("))


def test_a_lark_or_gbnf_grammar(byte_grammars: GrammarCompiler) -> None:
    for text in ('start: "a"+ "b"', 'root ::= "a"+ "b"'):
        grammar = byte_grammars.compile(GrammarSpec("grammar", text)).new_matcher()
        assert allowed(grammar.mask()) == [ord("a")]
        assert grammar.accept(ord("a")) is None and allowed(grammar.mask()) == [ord("a"), ord("b")]


@pytest.mark.parametrize("spec, says", [
    (GrammarSpec("regex", "["), "regex: .*unclosed character class"),
    (GrammarSpec("json", "{"), "json: not a JSON schema"),
    (GrammarSpec("json", "[1]"), "json: a JSON schema is an object"),
    (GrammarSpec("json", "false"), "json: the schema false allows no value"),
    (GrammarSpec("json", '{"a":' * 5000 + "1" + "}" * 5000), "json: the schema is nested too deeply"),
    (GrammarSpec("json", '{"properties":' * 400 + "{}" + "}" * 400), "json: .*recursion"),
    (GrammarSpec("json", '{"type": "nonsense"}'), "json: .*nonsense"),
    (GrammarSpec("grammar", "start: undefined_rule"), "grammar: .*undefined_rule"),
])
def test_a_grammar_that_does_not_compile_says_why(byte_grammars: GrammarCompiler, spec: GrammarSpec,
                                                   says: str) -> None:
    with pytest.raises(GrammarError, match=f"(?s){says}"):
        byte_grammars.compile(spec)


def test_a_bpe_vocabulary_and_ids_past_the_tokenizer(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 300)
    tokenizer = HFTokenizer(tmp_path / "tokenizer.json")
    grammars = GrammarCompiler(tokenizer, 320, [2])  # a model's logits may be wider than its tokenizer
    grammar = grammars.compile(GrammarSpec("regex", "(hello|world) [a-z]+!")).new_matcher()
    mask = grammar.mask()
    assert len(mask) == mask_bytes(320) and max(allowed(mask, 320)) < 300
    text_of = {t: tokenizer.decode([t]) for t in allowed(mask, 320)}
    assert text_of and all("hello".startswith(s) or "world".startswith(s) for s in text_of.values())
    for token in tokenizer.encode("hello abc!", add_special_tokens=False):
        assert grammar.accept(token) is None
    assert 2 in allowed(grammar.mask(), 320)  # complete: the end of sequence is allowed


def test_the_vocabulary_is_built_once_across_threads() -> None:
    grammars = GrammarCompiler(ByteTokenizer(), VOCAB, [EOS])
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(grammars._load()[1])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and all(v is seen[0] for v in seen)
    assert grammars.matches(grammars.tokenizer, VOCAB, [EOS]) and not grammars.matches(grammars.tokenizer, VOCAB, [1])


def test_without_llguidance_a_structured_request_is_refused_by_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails
    with pytest.raises(GrammarUnavailable, match="llguidance"):
        GrammarCompiler(ByteTokenizer(), VOCAB, [EOS]).compile(GrammarSpec("regex", "a"))


# ---------------------------------------------------------------- request checks


LIMITS = Limits(vocab_size=VOCAB, max_model_len=512, eos_token_ids=frozenset({EOS}))


def request(**so: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), structured_outputs=pb.StructuredOutputs(**so))


@pytest.mark.parametrize("fields, says", [
    ({}, "set exactly one of json, regex, choice, grammar, json_object and structural_tag$"),
    ({"regex": "a", "json_object": True}, "got regex, json_object"),
    ({"structural_tag": "{}", "json": "{}"}, "got json, structural_tag"),
    ({"json": " "}, "json is empty"),
    ({"grammar": ""}, "grammar is empty"),
    ({"structural_tag": ""}, "structural_tag is empty"),
    ({"regex": "a+", "whitespace_pattern": " "}, "whitespace_pattern: for json and json_object, not regex"),
    ({"json_object": True, "whitespace_pattern": " ", "disable_any_whitespace": True},
     "at most one of whitespace_pattern and disable_any_whitespace"),
    ({"choice": ["x"] * 1025}, "at most 1024 strings"),
    ({"regex": "a" * (1 << 20 | 1)}, "at most 1048576 characters"),
])
def test_the_cheap_checks_refuse_a_malformed_structured_output(fields: dict, says: str) -> None:
    with pytest.raises(InvalidRequest, match=f"^structured_outputs.*{says}"):
        check_fields(request(**fields), LIMITS)


def test_validation_compiles_the_grammar_and_names_a_bad_one(byte_grammars: GrammarCompiler) -> None:
    valid = validate_generate(request(regex="[ab]+"), ByteTokenizer(), LIMITS, grammars=byte_grammars)
    assert valid.grammar is not None and valid.grammar.kind == "regex"
    assert validate_generate(pb.GenerateRequest(text="hi"), ByteTokenizer(), LIMITS).grammar is None
    with pytest.raises(InvalidRequest, match=r"(?s)^structured_outputs\.regex: .*unclosed"):
        validate_generate(request(regex="(a"), ByteTokenizer(), LIMITS, grammars=byte_grammars)
    with pytest.raises(InvalidRequest, match="does not take structured outputs"):
        validate_generate(request(regex="a"), ByteTokenizer(), LIMITS)


# ---------------------------------------------------------------- the scheduler, against the simulated data plane


class MaskBlindRunner(SimRunner):
    """A data plane that ignores token masks (a bug the control plane must catch)."""

    def execute(self, plan: StepPlan, masks: TokenMasks | None = None) -> StepResult:
        scheduled = [msgspec.structs.replace(s, token_mask=b"") for s in plan.scheduled]
        return super().execute(msgspec.structs.replace(plan, scheduled=scheduled))  # masks that follow: dropped


def seq(seq_id: int, grammars: GrammarCompiler | None, spec: GrammarSpec | None, max_tokens: int = 40) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", prompt_token_ids=[16 + seq_id, 30, 31, 32, 33],
                    sampling=SamplingParams(temperature=0.0), stop=StopParams(max_tokens=max_tokens),
                    arrival_time=float(seq_id),
                    grammar=grammars.compile(spec).new_matcher() if grammars and spec else None)


def drive(seqs: list[Sequence], runner: SimRunner, num_blocks: int = 64, lookahead: int = 4, defer: bool = False,
          policy: object | None = None) -> dict[str, int]:
    """Two plans in flight (async scheduling); counts the plans a structured sequence was in with look-ahead.
    With `defer` (`defer_token_masks`) a plan whose masks follow runs once they are due, after the result
    before it, as the engine sends them; counts those plans too."""
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, defer_token_masks=defer)
    sched = Scheduler(config, BlockAllocator(num_blocks, 4), 10_000, frozenset({EOS}))
    sched.policy = policy or LookaheadPolicy(lookahead)  # type: ignore[assignment]
    for s in seqs:
        sched.add(s)
    structured = {s.seq_id for s in seqs if s.grammar is not None}
    sent: deque[StepPlan] = deque()
    results: dict[int, StepResult] = {}
    counts = {"steps": 0, "masked_ahead": 0, "lookahead_steps": 0, "masks_follow": 0}
    while sched.has_work() or sent:
        while len(sent) < sched.max_inflight:
            plan = sched.schedule()
            if plan is None:
                break
            for entry in plan.scheduled:
                assert bool(entry.token_mask) <= (entry.seq_id in structured and not plan.masks_follow)
                if entry.seq_id in structured and entry.seq_id in sched.seqs:
                    # never scheduled past an unseen token, unless its mask follows the plan
                    assert sched.seqs[entry.seq_id].num_inflight <= 1 + plan.masks_follow
            counts["masked_ahead"] += plan.decode_steps > 1 and any(e.token_mask for e in plan.scheduled)
            counts["lookahead_steps"] += plan.decode_steps > 1
            counts["masks_follow"] += plan.masks_follow
            assert not plan.masks_follow or (defer and plan.decode_steps == 1 and plan.mode == "aggregated")
            sent.append(plan)
            if not plan.masks_follow:
                results[plan.step_id] = runner.execute(plan)
        sched.update(results.pop(sent.popleft().step_id))
        masks = sched.token_masks_due()
        if masks is not None:
            assert sent and sent[0].masks_follow and masks.step_id == sent[0].step_id
            results[masks.step_id] = runner.execute(sent[0], masks)
        assert not sent or not sent[0].masks_follow or sent[0].step_id in results
        sched.check_invariants()
        counts["steps"] += 1
        assert counts["steps"] < 5000
    assert sched.allocator.num_free == num_blocks
    return counts


def text(s: Sequence) -> str:
    return bytes(t for t in s.output_token_ids if t < 256).decode("utf-8", errors="replace")


@pytest.mark.parametrize("defer", [False, True])  # masks in each plan, or following it (defer_token_masks)
def test_structured_sequences_follow_their_grammars_beside_free_ones(byte_grammars: GrammarCompiler,
                                                                     defer: bool) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": ["x", "yz"]}},
              "required": ["a", "b"], "additionalProperties": False}
    specs = [GrammarSpec("regex", "[a-z]{3}-[0-9]{4}"), GrammarSpec("choice", json.dumps(["alpha", "beta", "gamma"])),
             GrammarSpec("json", json.dumps(schema), disable_any_whitespace=True), None, None]
    seqs = [seq(i, byte_grammars, spec) for i, spec in enumerate(specs)]
    counts = drive(seqs, SimRunner(64, 4, VOCAB), defer=defer)
    assert re.fullmatch(r"[a-z]{3}-[0-9]{4}", text(seqs[0]))
    assert text(seqs[1]) in ("alpha", "beta", "gamma")
    parsed = json.loads(text(seqs[2]))
    assert set(parsed) == {"a", "b"} and isinstance(parsed["a"], bool) and parsed["b"] in ("x", "yz")
    for s in seqs[:3]:  # ended by the complete grammar (no end token sampled: it allows nothing more)
        assert s.finish_reason is FinishReason.STOP and EOS not in s.output_token_ids
    for s in seqs[3:]:  # free ones run to their length or the end token, looking ahead once the others are gone
        assert (s.finish_reason, len(s.output_token_ids)) == (FinishReason.LENGTH, 40) or (
            s.finish_reason is FinishReason.STOP and s.output_token_ids[-1] == EOS)
    assert counts["masked_ahead"] == 0 and counts["lookahead_steps"] > 0
    assert counts["masks_follow"] >= 8 if defer else counts["masks_follow"] == 0


def test_a_structured_sequence_survives_preemption(byte_grammars: GrammarCompiler) -> None:
    seqs = [seq(i, byte_grammars, GrammarSpec("regex", "[a-f]{30}") if i % 2 else None, max_tokens=36)
            for i in range(6)]
    drive(seqs, SimRunner(12, 4, VOCAB), num_blocks=12, lookahead=1)
    assert sum(s.num_preemptions for s in seqs) > 0
    for s in seqs[1::2]:
        assert re.fullmatch(r"[a-f]{30}", text(s)) and s.finish_reason is FinishReason.STOP


def test_a_token_the_grammar_refuses_fails_that_sequence_alone(byte_grammars: GrammarCompiler) -> None:
    seqs = [seq(0, byte_grammars, GrammarSpec("regex", "[0-9]{5}")), seq(1, None, None, max_tokens=8)]
    drive(seqs, MaskBlindRunner(64, 4, VOCAB))
    assert seqs[0].finish_reason is FinishReason.ERROR and "breaks the request's grammar" in (seqs[0].error or "")
    assert all(48 <= t <= 57 for t in seqs[0].output_token_ids)  # the refused token is not among its outputs
    assert seqs[1].finish_reason is FinishReason.LENGTH and len(seqs[1].output_token_ids) == 8


def test_a_structured_sequence_decodes_every_step_beside_free_ones(byte_grammars: GrammarCompiler) -> None:
    """With async scheduling a free sequence runs a step ahead; a structured one cannot (its next mask needs
    its token), so without deferred masks (`defer_token_masks` off) the steps go one at a time while it
    runs, and it gets a token each, as the free one does."""
    seqs = [seq(0, byte_grammars, GrammarSpec("regex", "[a-z]{20}")), seq(1, None, None, max_tokens=20)]
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, defer_token_masks=False),
                      BlockAllocator(64, 4), 10_000, frozenset({EOS}))
    runner = SimRunner(64, 4, VOCAB)
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert first is not None and {e.seq_id for e in first.scheduled} == {0, 1}
    assert sched.schedule() is None  # seq 0's token is in flight: nothing is planned past it
    sched.update(runner.execute(first))
    plans = 1
    while sched.has_work():
        plan = sched.schedule()
        assert plan is not None
        plans += 1
        if 0 in sched.seqs:
            assert {e.seq_id for e in plan.scheduled} == {0, 1} and sched.schedule() is None
        sched.update(runner.execute(plan))
    assert len(seqs[0].output_token_ids) == 20 and seqs[0].finish_reason is FinishReason.STOP
    assert plans == 20  # one step a token for both (the prefill step samples the first)


@pytest.mark.parametrize("cpus", [1, 2, 16])
def test_masks_computed_together_equal_each_alone(cpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    grammars_for = GrammarCompiler(ByteTokenizer(), VOCAB, [EOS])
    specs = [GrammarSpec("regex", "[0-9]+"), GrammarSpec("choice", json.dumps(["ab", "cd"])),
             GrammarSpec("json_object"), GrammarSpec("regex", "x{3}"), GrammarSpec("grammar", 'start: "q" "r"')]
    grammars = [grammars_for.compile(spec).new_matcher() for spec in specs]
    assert (grammars[0]._filler.executor is None) == (cpus < 4)  # two threads or more: half the cores
    assert grammars[0].accept(ord("7")) is None and grammars[1].accept(ord("c")) is None
    together = next_token_masks(grammars)
    assert together == [g.mask() for g in grammars] and len({len(m) for m in together}) == 1
    assert allowed(together[1]) == [ord("d")] and next_token_masks([]) == []


def test_an_executor_that_will_not_start_leaves_masks_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import llguidance

    def refuse(*_: object, **__: object) -> None:
        raise RuntimeError("no threads")

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr(llguidance, "LLExecutor", refuse)
    grammars_for = GrammarCompiler(ByteTokenizer(), VOCAB, [EOS])
    grammars = [grammars_for.compile(GrammarSpec("regex", "[ab]")).new_matcher() for _ in range(5)]
    assert grammars[0]._filler.executor is None
    assert [allowed(m) for m in next_token_masks(grammars)] == [[ord("a"), ord("b")]] * 5
