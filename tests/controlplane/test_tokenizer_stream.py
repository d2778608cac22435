"""Incremental detokenization with a byte-fallback tokenizer (Llama-2 style `<0xNN>` tokens): a token
that turns text already streamed into something else (a newline byte followed by a cut-off character)
makes the `tokenizers` stream raise "Invalid prefix"; the stream starts over there and keeps going, so
the text after it (and any stop string in it) is not lost."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models

from controlplane.output import OutputProcessor
from controlplane.tokenizer import HFTokenizer


def byte_fallback_tokenizer(folder: Path) -> HFTokenizer:
    vocab = {"<unk>": 0}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyzTH":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


def ids_of(tok: HFTokenizer, text: str) -> list[int]:
    return [tok._tokenizer.token_to_id(ch) for ch in text.replace(" ", "▁")]


def test_the_stream_recovers_from_an_invalid_prefix_and_stop_strings_still_match(tmp_path: Path) -> None:
    tok = byte_fallback_tokenizer(tmp_path)
    bad = [tok._tokenizer.token_to_id("<0x0A>"), tok._tokenizer.token_to_id("<0xE6>")]  # "\n", then half a char
    ids = ids_of(tok, "Hi") + bad + ids_of(tok, " the quick fox")
    stream = tok.stream()
    streamed = "".join(stream.step(i) for i in ids)
    assert streamed.startswith("Hi") and streamed.endswith("the quick fox"), streamed
    processor = OutputProcessor(tok.stream(), ("quick",))
    assert processor.add_tokens(ids) == "quick"


def test_a_stream_primed_with_the_prompt_keeps_the_first_words_leading_space(tmp_path: Path) -> None:
    """A SentencePiece decoder strips the first word's leading space. Primed with the prompt's last tokens
    (as vLLM's detokenizer), the completion's first word keeps it, so prompt + completion reads as the
    whole sequence decodes, and a stop string that starts with a space matches at the first word."""
    tok = byte_fallback_tokenizer(tmp_path)
    prompt, output = ids_of(tok, "Hi there"), ids_of(tok, " the fox")
    unprimed = "".join(tok.stream().step(i) for i in output)
    primed_stream = tok.stream(prompt_ids=prompt)
    primed = "".join(primed_stream.step(i) for i in output)
    assert primed == " the fox" and not unprimed.startswith(" ")
    assert "Hi there" + primed == tok.decode(prompt + output)
    short = tok.stream(prompt_ids=ids_of(tok, "H"))  # a prompt shorter than the suffix tried: all of it
    assert "".join(short.step(i) for i in output) == " the fox"
    processor = OutputProcessor(tok.stream(prompt_ids=prompt), (" the",))
    assert processor.add_tokens(output) == " the" and processor.stop_kept == 4 and processor.take_text(True) == ""
