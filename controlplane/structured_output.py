"""Structured outputs (vLLM's `structured_outputs`): a JSON schema, any JSON object, a regex, a choice of
strings, a grammar, or structural tags (free text whose tagged segments follow their schemas) that every
completion of a request must follow, compiled by llguidance.

`GrammarCompiler.compile` checks a request's grammar against the model's vocabulary (on a worker thread:
a large schema takes a while) and gives a `CompiledGrammar`; each completion gets its own `TokenGrammar`,
a matcher the scheduler asks for the next token's bitmask (sent in the plan; the data plane applies it to
the logits) and feeds each token that comes back. This module must not import torch or touch the socket;
llguidance is imported on the first structured request, so a server that never gets one never loads it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import numpy as np

from controlplane.tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer
from shared.messages import ScheduledSeq, SeqTokenMask, TokenMasks

if TYPE_CHECKING:
    from controlplane import sequence

log = logging.getLogger(__name__)

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
MAX_ERROR_CHARS = 600  # of llguidance's message about a bad grammar, in the client's error
MAX_STRUCTURAL_TAGS = 1024  # triggers, and structures, in one structural_tag


def grammars_available() -> bool:
    """Whether this server can compile grammars (llguidance is installed; it is not imported here)."""
    return importlib.util.find_spec("llguidance") is not None


class GrammarError(ValueError):
    """The request's grammar does not compile; the message says why (a client error)."""


class GrammarUnavailable(RuntimeError):
    """This server cannot compile grammars (llguidance is not installed, or the vocabulary is unusable)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asked for: `text` is the JSON schema, the regex, the grammar (Lark or GBNF), the
    structural tags (vLLM's JSON), or for `choice` a JSON list of the strings; `disable_any_whitespace`: JSON
    without free whitespace; `whitespace_pattern`: the regex JSON's free whitespace matches instead."""

    kind: GrammarKind
    text: str = ""
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None


class _MaskFiller:
    """Writes matchers' bitmasks for one vocabulary: llguidance's numpy helpers and, given four cores or
    more, an executor that computes several at once on its own threads (without the GIL; half the cores,
    at most 8). No executor (fewer cores, or one that would not start): one mask at a time."""

    def __init__(self, llg: Any, vocab_size: int) -> None:
        self.words = (vocab_size + 31) // 32
        self.fill_one = llg.numpy.fill_next_token_bitmask
        self.fill_many = llg.numpy.fill_next_token_bitmask_par
        threads = min(8, (os.cpu_count() or 1) // 2)
        self.executor: Any = None
        if threads > 1:
            try:
                self.executor = llg.LLExecutor(num_threads=threads)
            except Exception as exc:  # e.g. a container's thread limit: masks one at a time instead
                log.warning("structured outputs: llguidance's executor did not start (%s); masks are computed "
                            "one at a time", exc)


class TokenGrammar:
    """One completion's matcher: the tokens it allows next, and each token it is fed."""

    __slots__ = ("_matcher", "_filler")

    def __init__(self, matcher: Any, filler: _MaskFiller) -> None:
        self._matcher = matcher
        self._filler = filler

    def mask(self) -> bytes:
        """The bitmask of the tokens allowed next: bit t % 32 of little-endian 32-bit word t // 32,
        ceil(vocab_size / 32) words (the data plane's layout, `shared.messages.ScheduledSeq.token_mask`)."""
        bitmask = np.zeros((1, self._filler.words), dtype=np.int32)
        self._filler.fill_one(self._matcher, bitmask, 0)
        return bitmask.tobytes()

    def accept(self, token_id: int) -> str | None:
        """Feed a sampled token; None if the grammar allows it, else why not (the matcher is then broken)."""
        if self._matcher.consume_token(token_id):
            return None
        return self._matcher.get_error().split("\n", 1)[0] or f"token {token_id} is not allowed here"

    @property
    def done(self) -> bool:
        """The grammar is complete and allows no further token (but an end of sequence)."""
        return self._matcher.is_stopped()


PARALLEL_MIN_MASKS = 4  # fewer are computed one at a time (a parallel call costs more than it saves)


def next_token_masks(grammars: list[TokenGrammar]) -> list[bytes]:
    """`TokenGrammar.mask` of each, computed together: in parallel on the executor's threads when there
    are enough of them and they share a vocabulary."""
    filler = grammars[0]._filler if grammars else None
    if (len(grammars) < PARALLEL_MIN_MASKS or filler is None or filler.executor is None
            or any(g._filler is not filler for g in grammars)):
        return [g.mask() for g in grammars]
    bitmask = np.zeros((len(grammars), filler.words), dtype=np.int32)
    filler.fill_many(filler.executor, [(g._matcher, i) for i, g in enumerate(grammars)], bitmask)
    return [row.tobytes() for row in bitmask]


def add_token_masks(scheduled: list[ScheduledSeq], masked: list[tuple[int, sequence.Sequence]]) -> None:
    """Give the plan entries at these positions the bitmask of the tokens their sequence's grammar allows
    next (each samples this step; its earlier tokens are all in), computed together (`next_token_masks`)."""
    grammars = []
    for _, seq in masked:
        assert seq.grammar is not None and seq.num_inflight == 1, "a structured output's mask needs its tokens"
        grammars.append(seq.grammar)
    for (i, _), mask in zip(masked, next_token_masks(grammars)):
        scheduled[i] = msgspec.structs.replace(scheduled[i], token_mask=mask)


def deferred_token_masks(step_id: int, seqs: list[sequence.Sequence], live: dict[int, sequence.Sequence],
                         stale: set[int]) -> TokenMasks:
    """The TokenMasks of a step planned with `masks_follow`, once the tokens before it are all in: the
    mask of each of its structured outputs still live (`live`, not preempted since: `stale`), computed
    together. One that ended since (stop, abort, error) is left out: its token is dropped on arrival."""
    current = [s for s in seqs if live.get(s.seq_id) is s and s.seq_id not in stale and s.grammar is not None]
    for seq in current:
        assert seq.num_inflight == 1, "a structured output's mask needs its tokens"
    masks = next_token_masks([s.grammar for s in current])  # type: ignore[misc]
    return TokenMasks(step_id=step_id, masks=[SeqTokenMask(seq_id=s.seq_id, mask=m) for s, m in zip(current, masks)])


class CompiledGrammar:
    """A grammar checked against the vocabulary; `new_matcher` gives each completion its own state."""

    def __init__(self, kind: GrammarKind, matcher: Any, filler: _MaskFiller) -> None:
        self.kind = kind
        self._template = matcher  # never fed a token: a fresh copy is a fresh start
        self._filler = filler

    def new_matcher(self) -> TokenGrammar:
        return TokenGrammar(self._template.deep_copy(), self._filler)


def _grammar_text(llg: Any, spec: GrammarSpec) -> str:
    """The llguidance grammar of a spec (JSON is parsed here, so a bad one is named as such)."""
    if spec.kind == "structural_tag":
        return _structural_tag_grammar(llg, spec.text, spec.disable_any_whitespace)
    json_options: dict[str, Any] = {"whitespace_flexible": not spec.disable_any_whitespace}
    if spec.whitespace_pattern is not None:
        json_options["whitespace_pattern"] = spec.whitespace_pattern
    if spec.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=json_options)
    if spec.kind == "json":
        try:
            schema = json.loads(spec.text)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"json: not a JSON schema ({exc})") from exc
        except RecursionError as exc:
            raise GrammarError("json: the schema is nested too deeply") from exc
        if schema is True:
            schema = {}  # any JSON value
        elif schema is False:
            raise GrammarError("json: the schema false allows no value")
        elif not isinstance(schema, dict):
            raise GrammarError("json: a JSON schema is an object (or true)")
        try:
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=json_options)
        except ValueError as exc:
            raise GrammarError(f"json: {exc}") from exc
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        return llg.grammar_from("choice", spec.text)
    try:
        return llg.grammar_from("grammar", spec.text)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise GrammarError(f"grammar: {exc}") from exc


def _structural_tag_grammar(llg: Any, text: str, disable_any_whitespace: bool = False) -> str:
    """vLLM's structural tag (`{"structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}`) as an
    llguidance grammar: free text in which each trigger starts a structure whose begin starts with it (a
    schema may be JSON text, as vLLM takes it; `disable_any_whitespace` holds in each)."""
    try:
        spec = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise GrammarError(f"structural_tag: not JSON ({exc})") from exc
    if not isinstance(spec, dict) or spec.get("type", "structural_tag") != "structural_tag":
        raise GrammarError('structural_tag: an object {"structures": [...], "triggers": [...]}')
    structures, triggers = spec.get("structures"), spec.get("triggers")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise GrammarError("structural_tag.triggers: a list of one or more non-empty strings")
    if not isinstance(structures, list) or not structures:
        raise GrammarError("structural_tag.structures: a list of one or more structures")
    triggers = list(dict.fromkeys(triggers))
    if len(triggers) > MAX_STRUCTURAL_TAGS or len(structures) > MAX_STRUCTURAL_TAGS:
        raise GrammarError(f"structural_tag: at most {MAX_STRUCTURAL_TAGS} triggers and {MAX_STRUCTURAL_TAGS} "
                           f"structures, got {len(triggers)} and {len(structures)}")
    tags = []
    for i, structure in enumerate(structures):
        where = f"structural_tag.structures[{i}]"
        if not isinstance(structure, dict) or not all(isinstance(structure.get(k), str) for k in ("begin", "end")):
            raise GrammarError(f"{where}: an object with strings begin and end and a schema")
        schema = structure.get("schema", True)
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise GrammarError(f"{where}.schema: not a JSON schema ({exc})") from exc
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(f"{where}.schema: a JSON schema is an object (or true)")
        if disable_any_whitespace:  # llguidance reads a schema's own options from x-guidance
            schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), "whitespace_flexible": False}}
        begin = structure["begin"]
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise GrammarError(f"{where}.begin {begin!r} starts with none of the triggers")
        tags.append(llg.StructTag(trigger=trigger, begin=begin, grammar=schema, end=structure["end"]))
    return llg.StructTag.to_grammar(tags)


class _ByteVocabulary:
    """`ByteTokenizer`'s vocabulary as llguidance reads one: ids 0-255 are bytes, the rest special."""

    def __init__(self, vocab_size: int, eos_token_id: int | None) -> None:
        self.tokens = [bytes([i]) for i in range(256)] + [b"\xff<|special_%d|>" % i for i in range(256, vocab_size)]
        self.special_token_ids = list(range(256, vocab_size))
        self.eos_token_id = eos_token_id
        self.bos_token_id = None

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode("utf-8"))


class GrammarCompiler:
    """Compiles requests' grammars for one model: its tokenizer, its logits' width (`vocab_size`, which
    may exceed the tokenizer's: the ids past it are never allowed) and its end-of-sequence tokens (which
    a complete grammar allows). The llguidance vocabulary is built on first use (about a second for a
    150k-token vocabulary), once, behind a lock: callers are worker threads."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._lock = threading.Lock()
        self._llg: Any = None
        self._vocabulary: Any = None
        self._filler: _MaskFiller | None = None

    def matches(self, tokenizer: TextTokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> bool:
        return (tokenizer is self.tokenizer and vocab_size == self.vocab_size
                and list(eos_token_ids) == self.eos_token_ids)

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._vocabulary is None:
                try:
                    import llguidance
                    import llguidance.numpy
                except ImportError as exc:
                    raise GrammarUnavailable("structured outputs need the llguidance package, which this "
                                             "server lacks") from exc
                eos: int | list[int] | None = self.eos_token_ids or None
                try:
                    if isinstance(self.tokenizer, HFTokenizer):
                        source: Any = self.tokenizer.tokenizer_json()
                    elif isinstance(self.tokenizer, ByteTokenizer):
                        source = llguidance.TokenizerWrapper(
                            _ByteVocabulary(self.vocab_size, self.eos_token_ids[0] if self.eos_token_ids else None))
                    else:
                        raise GrammarUnavailable(f"structured outputs: no grammar support for the "
                                                 f"{type(self.tokenizer).__name__} tokenizer")
                    vocabulary = llguidance.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=eos)
                except (ValueError, RuntimeError) as exc:
                    if isinstance(exc, GrammarUnavailable):
                        raise
                    raise GrammarUnavailable(f"structured outputs: llguidance cannot read this model's "
                                             f"vocabulary ({exc})") from exc
                self._filler = _MaskFiller(llguidance, self.vocab_size)  # before the vocabulary marks it loaded
                self._llg, self._vocabulary = llguidance, vocabulary
            return self._llg, self._vocabulary

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The spec's grammar, checked; GrammarError (naming the field) if it does not compile."""
        llg, vocabulary = self._load()
        if spec.whitespace_pattern is not None:  # named on its own (in the JSON grammar it would be the json's)
            error = llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_regex(spec.whitespace_pattern),
                                                   vocabulary)
            if error:
                raise GrammarError(f"whitespace_pattern: {error.strip()[:MAX_ERROR_CHARS]}")
        text = _grammar_text(llg, spec)
        error = llg.LLMatcher.validate_grammar(text, vocabulary)
        if error:
            raise GrammarError(f"{spec.kind}: {error.strip()[:MAX_ERROR_CHARS]}")
        matcher = llg.LLMatcher(vocabulary, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{spec.kind}: {matcher.get_error().strip()[:MAX_ERROR_CHARS]}")
        assert self._filler is not None
        return CompiledGrammar(spec.kind, matcher, self._filler)
