"""Incremental detokenization with a byte-fallback tokenizer (Llama-2 style `<0xNN>` tokens): a token
that turns text already streamed into something else (a newline byte followed by a cut-off character)
makes the `tokenizers` stream raise "Invalid prefix"; the stream starts over there and keeps going, so
the text after it (and any stop string in it) is not lost."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models

from controlplane.output import OutputProcessor
from controlplane.tokenizer import ByteTokenizer, HFTokenizer
from tests.factories import write_tokenizer


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


def test_a_tokens_text_alone_is_its_decoding_with_a_dropped_leading_space_put_back(tmp_path: Path) -> None:
    """token_text (a logprob's text, as vLLM's decoded_token): special tokens render, a byte of a longer
    character reads U+FFFD, an id past the vocabulary reads '', and the leading space a SentencePiece
    decoder strips from a lone word is put back, for a Replace+Strip decoder and a Metaspace one."""
    tok = byte_fallback_tokenizer(tmp_path)
    assert tok._tokenizer.decode([tok._tokenizer.token_to_id("▁")]) == ""  # the space a lone word loses
    assert [tok.token_text(i) for i in ids_of(tok, " the")] == [" ", "t", "h", "e"]
    assert tok.token_text(tok._tokenizer.token_to_id("<0xE6>")) == "\ufffd"
    assert tok.token_text(tok._tokenizer.token_to_id("<unk>")) == "<unk>" and tok.token_text(10**6) == ""
    words = {"<unk>": 0, "▁the": 1, "fox": 2, "▁▁x": 3}
    meta = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    meta.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    meta.save(str(tmp_path / "meta.json"))
    sp = HFTokenizer(tmp_path / "meta.json")
    assert sp._tokenizer.decode([1]) == "the"
    assert [sp.token_text(i) for i in (1, 2, 3)] == [" the", "fox", "  x"]


def test_token_text_of_byte_level_bpe_and_byte_tokenizers(tmp_path: Path) -> None:
    """A byte-level BPE decoder keeps a token's spaces: its text alone is plain decode, special tokens
    included; the byte fallback tokenizer's is the byte's character, and a special id has none."""
    tok = HFTokenizer(write_tokenizer(tmp_path, 512))
    ids = tok.encode("Hello world, the fox") + [0, 1, 2]
    assert [tok.token_text(i) for i in ids] == [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert " world" in [tok.token_text(i) for i in ids] and tok.token_text(1) == "<s>"
    assert tok._space_marker is None
    byte = ByteTokenizer(bos_token_id=256)
    assert [byte.token_text(i) for i in (65, 0xE6, 256)] == ["A", "\ufffd", ""]
