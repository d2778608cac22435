"""Incremental detokenisation, stop strings across token boundaries, hold-back of their prefixes, and
the collector that merges the deltas a busy stream has not taken yet."""

from __future__ import annotations

import asyncio

from controlplane.output import DeltaCollector, OutputProcessor, RequestDelta, merge_deltas
from controlplane.tokenizer import ByteTokenizer
from shared.messages import TokenLogprobs


def feed(text: str, stops: tuple[str, ...], chunk: int = 1) -> tuple[str, str | None, list[str]]:
    tok = ByteTokenizer()
    proc = OutputProcessor(tok.stream(), stops)
    ids = tok.encode(text)
    streamed: list[str] = []
    stop = None
    for i in range(0, len(ids), chunk):
        stop = proc.add_tokens(ids[i : i + chunk])
        streamed.append(proc.take_text(final=stop is not None))
        if stop:
            break
    if stop is None:
        streamed.append(proc.take_text(final=True))
    return "".join(streamed), stop, streamed


def test_stop_string_split_across_tokens_is_cut_and_never_streamed() -> None:
    text, stop, streamed = feed("Hello wor" + "ld STOP here", ("STOP",))
    assert stop == "STOP" and text == "Hello world "
    assert all("S" not in piece for piece in streamed)


def test_prefix_of_a_stop_string_is_held_back_then_released() -> None:
    text, stop, streamed = feed("abc STOx and more", ("STOP",))
    assert stop is None and text == "abc STOx and more"
    assert "".join(streamed[:7]) == "abc "  # "STO" held back while it could still become "STOP"


def test_multibyte_characters_are_never_split() -> None:
    text, _, streamed = feed("日本語 🙂", ())
    assert text == "日本語 🙂"
    assert all("\ufffd" not in piece for piece in streamed)


def test_earliest_of_several_stop_strings_wins_and_chunks_work() -> None:
    text, stop, _ = feed("one two three four", ("four", "two"), chunk=5)
    assert stop == "two" and text == "one "


def test_byte_tokenizer_special_ids_render_empty() -> None:
    tok = ByteTokenizer(bos_token_id=256)
    assert tok.encode("hi") == [256, 104, 105]
    assert tok.decode([256, 104, 105, 300]) == "hi"


def _lp(token: int) -> TokenLogprobs:
    return TokenLogprobs(logprob=-float(token), top_token_ids=[token], top_logprobs=[-float(token)])


def test_merged_deltas_read_as_one() -> None:
    first = RequestDelta([1, 2], "ab", [_lp(1), _lp(2)])
    first.prompt_logprobs, first.prompt_token_ids = [_lp(9)], [8, 9]
    final = RequestDelta([3], "c", [_lp(3)], finish_reason="stop", stop_reason="x", prompt_tokens=2,
                         completion_tokens=3, cached_tokens=1)
    merged = merge_deltas(first, final)
    assert (merged.token_ids, merged.text) == ([1, 2, 3], "abc")
    assert merged.logprobs == [_lp(1), _lp(2), _lp(3)] and merged.prompt_logprobs == [_lp(9)]
    assert (merged.finish_reason, merged.stop_reason, merged.prompt_tokens, merged.completion_tokens,
            merged.cached_tokens) == ("stop", "x", 2, 3, 1)
    assert first.token_ids == [1, 2] and first.finish_reason is None  # the inputs are left as they were
    plain = merge_deltas(RequestDelta([1], "a"), RequestDelta([2], "b"))
    assert plain.logprobs is None and plain.finish_reason is None
    error = merge_deltas(RequestDelta([1], "a"), RequestDelta([], "", error="lost", finish_reason="error",
                                                              retryable=True))
    assert (error.token_ids, error.finish_reason, error.error, error.retryable) == ([1], "error", "lost", True)


async def test_the_collector_merges_what_its_stream_has_not_taken() -> None:
    collector = DeltaCollector()
    waiter = asyncio.create_task(collector.get())
    await asyncio.sleep(0)
    assert not waiter.done()  # nothing put yet
    collector.put_nowait(RequestDelta([1], "a"))
    assert (await waiter).token_ids == [1] and collector.qsize() == 0
    for token in (2, 3, 4):  # the stream is busy: three deltas pile up
        collector.put_nowait(RequestDelta([token], chr(ord("a") + token - 1)))
    assert collector.qsize() == 1 and collector.merges == 2
    got = await collector.get()
    assert (got.token_ids, got.text) == ([2, 3, 4], "bcd")
    engine_list = [5]  # a delta's list may be the engine's own: merging must not write to it
    first = RequestDelta(engine_list, "e", [_lp(5)])
    collector.put_nowait(first)
    for token in range(6, 2006):  # a long backlog: it grows in place
        collector.put_nowait(RequestDelta([token], "f", [_lp(token)]))
    collector.put_nowait(RequestDelta([], "!", finish_reason="length", completion_tokens=2001))
    got = await collector.get()
    assert got.token_ids == list(range(5, 2006)) and got.text == "e" + "f" * 2000 + "!"
    assert got.logprobs == [_lp(t) for t in range(5, 2006)] and got.finish_reason == "length"
    assert got.completion_tokens == 2001 and engine_list == [5] and first.logprobs == [_lp(5)]


async def test_a_stream_interval_holds_messages_until_enough_tokens() -> None:
    collector = DeltaCollector(interval=3)
    collector.put_nowait(RequestDelta([1], "a"))
    assert (await asyncio.wait_for(collector.get(), 1)).token_ids == [1]  # the first goes at once
    collector.put_nowait(RequestDelta([2], "b"))
    collector.put_nowait(RequestDelta([3], "c"))
    waiter = asyncio.create_task(collector.get())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # two tokens pending, three needed
    collector.put_nowait(RequestDelta([4], "d"))
    assert (await asyncio.wait_for(waiter, 1)).token_ids == [2, 3, 4]
    collector.put_nowait(RequestDelta([5], "e", finish_reason="length"))
    assert (await asyncio.wait_for(collector.get(), 1)).finish_reason == "length"  # the end goes at once
    try:
        DeltaCollector(interval=0)
    except ValueError as exc:
        assert "must be >= 1" in str(exc)
    else:
        raise AssertionError("interval 0 accepted")


def test_stop_strings_count_only_after_min_tokens() -> None:
    """A stop string ending in the text of the first min_tokens tokens does not stop, the min_tokens-th
    included (EOS cannot be that token either: the sampler masks it); one ending after them does (vLLM's
    `num_output_tokens() > min_tokens`)."""
    tok = ByteTokenizer()
    ids = tok.encode("ab STOP cd STOP ef")  # a byte a token: the first STOP ends at token 7
    for min_tokens, want_text in ((0, "ab "), (6, "ab "), (7, "ab STOP cd ")):
        proc = OutputProcessor(tok.stream(), ("STOP",), min_tokens=min_tokens)
        stop = None
        for token in ids:
            if (stop := proc.add_tokens([token])) is not None:
                break
        assert stop == "STOP" and proc.take_text(final=True) == want_text, min_tokens


def test_of_several_stop_strings_the_first_to_end_wins_however_the_text_is_split() -> None:
    for chunk in (1, 2, 5):
        text, stop, _ = feed("xabcy", ("abc", "b"), chunk=chunk)
        assert (text, stop) == ("xa", "b"), chunk


def test_a_short_stop_string_in_the_text_before_min_tokens_is_not_matched_later() -> None:
    """Stop strings of different lengths: the text searched for each is only where it could end in the
    new piece, so "\\n" from token 2 (before min_tokens 3) does not stop the text at token 3, where the
    longest stop string's hold-back reaches back over it."""
    tok = ByteTokenizer()
    proc = OutputProcessor(tok.stream(), ("User:", "\n"), min_tokens=3)
    stops = [proc.add_tokens([t]) for t in tok.encode("b\nbb\nb")]
    assert stops[:4] == [None, None, None, None] and stops[4] == "\n"
    assert proc.take_text(final=True) == "b\nbb"


def test_text_is_not_held_back_when_the_stop_string_stays_in_the_output() -> None:
    """With include_stop_str nothing streamed is ever taken back, so no prefix is held (vLLM's stop buffer 0)."""
    tok = ByteTokenizer()
    for include, want in ((True, ["a", "b", "S", "T", "O", "P"]), (False, ["", "", "", "a", "b", ""])):
        proc = OutputProcessor(tok.stream(), ("STOP",), include_stop_str=include)
        pieces = []
        for token in tok.encode("abSTOP"):
            stop = proc.add_tokens([token])
            pieces.append(proc.take_text(final=stop is not None))
        assert stop == "STOP" and pieces[:-1] == want[:-1], include
        assert "".join(pieces) == ("abSTOP" if include else "ab"), include


def test_the_token_that_ended_the_sequence_adds_no_text_unless_stop_strings_are_kept() -> None:
    """EOS or a stop token id ends the sequence: its text is left out (it still counts as a token), as
    vLLM's detokenizer leaves it out unless include_stop_str_in_output; nor is it searched for stop strings."""
    tok = ByteTokenizer()
    for include, want in ((False, "abc"), (True, "abcX")):
        proc = OutputProcessor(tok.stream(), ("cX",), include_stop_str=include)
        assert proc.add_tokens(tok.encode("abc")) is None
        stop = proc.add_tokens(tok.encode("X"), stop_token_ended=True)
        assert proc.take_text(final=True) == ("abc" if not include else "abcX")
        assert stop == (None if not include else "cX") and proc.text == want, include
