"""A stop string completed inside a multi-token update (a look-ahead step returns k tokens at once): the
engine streams and counts only the tokens up to the one that completed it, as a stop token would."""

from __future__ import annotations

import asyncio

from controlplane.engine import Engine, EngineRequest
from controlplane.kv_blocks import BlockAllocator
from controlplane.policies import ModeDecision
from controlplane.scheduler import Scheduler
from controlplane.sequence import StopParams
from controlplane.tokenizer import ByteTokenizer
from shared.config import SchedulerConfig
from shared.messages import SamplingParams, SeqOutput, StepResult, TokenLogprobs


def test_tokens_after_a_stop_string_in_a_lookahead_update_are_dropped() -> None:
    config = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=32, async_scheduling=False)
    engine = Engine(None, lambda ready: ByteTokenizer(), config)  # type: ignore[arg-type]
    engine.tokenizer = ByteTokenizer()
    engine.scheduler = scheduler = Scheduler(config, BlockAllocator(64, 16), 10_000, frozenset({2}))
    handle = engine.add_request(EngineRequest("r", list(b"hello"), SamplingParams(temperature=0.0, logprobs=0),
                                              StopParams(max_tokens=50, stop_strings=("Xb",))))
    plan = scheduler.schedule()
    first = [TokenLogprobs(logprob=-1.0)]
    engine._emit(scheduler.update(StepResult(step_id=plan.step_id, outputs=[
        SeqOutput(seq_id=0, token_ids=[ord("a")], logprobs=first)])))
    scheduler.policy.decide = lambda batch, forecast: ModeDecision(decode_steps=4)  # type: ignore[method-assign]
    plan = scheduler.schedule()
    assert plan is not None and plan.decode_steps == 4
    ids = [ord(c) for c in "Xbcd"]
    engine._emit(scheduler.update(StepResult(step_id=plan.step_id, outputs=[
        SeqOutput(seq_id=0, token_ids=ids, logprobs=[TokenLogprobs(logprob=-float(t)) for t in ids])])))
    merged = asyncio.run(handle.queue.get())  # the stream's undelivered deltas, merged
    assert merged.finish_reason == "stop" and merged.stop_reason == "Xb"
    assert merged.token_ids == list(b"aXb")  # "b" completed the stop string; "c", "d" came after it
    assert merged.logprobs is not None and [-lp.logprob for lp in merged.logprobs] == [1.0, *map(float, b"Xb")]
    assert merged.text == "a" and merged.completion_tokens == 3
    assert not scheduler.seqs and scheduler.allocator.num_free == scheduler.allocator.num_blocks


def test_a_stop_string_before_a_stop_token_in_one_update_is_the_stop_reason() -> None:
    """The look-ahead update "X b <stop token>": the stop token finished the sequence when its tokens
    were taken, but the string "Xb" came first, so the output ends at "b" and the reason is the string."""
    config = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=32, async_scheduling=False)
    engine = Engine(None, lambda ready: ByteTokenizer(), config)  # type: ignore[arg-type]
    engine.tokenizer = ByteTokenizer()
    engine.scheduler = scheduler = Scheduler(config, BlockAllocator(64, 16), 10_000, frozenset({2}))
    handle = engine.add_request(EngineRequest("r", list(b"hello"), SamplingParams(temperature=0.0),
                                              StopParams(max_tokens=50, stop_strings=("Xb",),
                                                         stop_token_ids=frozenset({ord("c")}))))
    plan = scheduler.schedule()
    engine._emit(scheduler.update(StepResult(step_id=plan.step_id, outputs=[SeqOutput(seq_id=0, token_ids=[ord("a")])])))
    scheduler.policy.decide = lambda batch, forecast: ModeDecision(decode_steps=4)  # type: ignore[method-assign]
    plan = scheduler.schedule()
    assert plan is not None and plan.decode_steps == 4
    engine._emit(scheduler.update(StepResult(step_id=plan.step_id, outputs=[
        SeqOutput(seq_id=0, token_ids=[ord(c) for c in "Xbcd"])])))
    merged = asyncio.run(handle.queue.get())
    assert merged.token_ids == list(b"aXb") and merged.completion_tokens == 3
    assert merged.finish_reason == "stop" and merged.stop_reason == "Xb"
