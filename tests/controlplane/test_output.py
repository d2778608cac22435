"""Incremental detokenisation, stop strings across token boundaries, and hold-back of their prefixes."""

from __future__ import annotations

from controlplane.output import OutputProcessor
from controlplane.tokenizer import ByteTokenizer


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
