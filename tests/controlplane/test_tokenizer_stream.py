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
