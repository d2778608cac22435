"""Text <-> token ids for the control plane, with incremental (streaming) detokenisation.

`HFTokenizer` wraps a checkpoint's `tokenizer.json` (Hugging Face `tokenizers`); `ByteTokenizer` is
the fallback for random-weight presets: ids 0-255 are raw bytes, larger ids are special tokens that
render as nothing. Neither loads anything from a hub. Whole prompts are encoded on worker threads
(the API's), never on the event loop, which runs the engine's step loop.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TokenStream(Protocol):
    def step(self, token_id: int) -> str:
        """Feed one generated token; return the text it completes (often '', never partial UTF-8)."""
        ...


class TextTokenizer(Protocol):
    name: str

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def stream(self, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()) -> TokenStream: ...

    def token_text(self, token_id: int) -> str:
        """One token's text decoded alone, special tokens included, as vLLM's `decoded_token` of a logprob
        (a lone byte of a longer character reads U+FFFD)."""
        ...


# A stream is primed with the prompt's last tokens, so the first generated word decodes as it follows the
# prompt (a SentencePiece decoder strips the leading space of the first word it sees): as vLLM, the
# shortest suffix of at least 4 and at most 23 tokens whose text has no broken character, or the whole
# prompt when it is that short. When every such suffix has one, vLLM primes with the whole prompt; this
# takes its last 4 (a long prompt would cost a decode step a token).
_PRIME_MIN, _PRIME_MAX = 4, 24


class _NoText:
    """A stream for requests that asked for token ids only: every token completes no text."""

    def step(self, token_id: int) -> str:
        return ""


NO_TEXT: TokenStream = _NoText()


class _HFStream:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token_id in _prime_ids(tokenizer, prompt_ids, skip_special_tokens):  # their text is the prompt's
            try:
                self._stream.step(tokenizer, token_id)
            except Exception:  # a prompt id the decoder cannot take: start unprimed
                self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
                break

    def step(self, token_id: int) -> str:
        try:
            chunk = self._stream.step(self._tokenizer, token_id)
        except Exception as exc:
            if not str(exc).startswith("Invalid prefix"):  # an id the tokenizer does not know (padded vocabs)
                return ""
            # a byte-fallback token changed text already streamed (a cut-off character after it): the
            # failed token would stay in the decoder and fail every later step, so start a fresh decoder
            # at this token, as vLLM's incremental detokenizer does (a fresh decoder strips the leading
            # space of its first word, as vLLM's does: a space can be lost there, not the text after)
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            try:
                chunk = self._stream.step(self._tokenizer, token_id)
            except Exception:
                return ""
        return chunk or ""


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self._tokenizer = Tokenizer.from_file(str(path))
        self._space_marker = _space_marker(self._tokenizer)
        # token id -> its text alone: at most one entry per id the model emits (~10 MB for 150k ids);
        # filled from the event loop and from worker threads alike (an entry is set whole, under the GIL)
        self._token_texts: dict[int, str] = {}

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def tokenizer_json(self) -> str:
        """The tokenizer as its tokenizer.json text (what llguidance builds its vocabulary from)."""
        return self._tokenizer.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Through the batch call, which releases the GIL (`encode` holds it: a 1 MB prompt froze the
        event loop for 1.3 s), so a caller's worker thread leaves the loop free."""
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Through the batch call too, for the same reason."""
        return self._tokenizer.decode_batch([token_ids], skip_special_tokens=skip_special_tokens)[0]

    def stream(self, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()) -> TokenStream:
        return _HFStream(self._tokenizer, skip_special_tokens, prompt_ids)

    def token_text(self, token_id: int) -> str:
        """Decoded alone; a SentencePiece-style decoder strips a lone word's leading space, which is put
        back from the vocabulary's piece (its leading markers). vLLM does so when the pre-tokenizer is a
        Metaspace; this goes by the decoder, so a Llama-2 style Replace+Strip one keeps it too. An id
        past the tokenizer's vocabulary (a padded embedding) reads ''."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode_batch([[token_id]], skip_special_tokens=False)[0]
            piece = self._tokenizer.id_to_token(token_id)
            if self._space_marker and piece:
                markers = len(piece) - len(piece.lstrip(self._space_marker))
                missing = markers - (len(text) - len(text.lstrip(" ")))
                text = " " * missing + text if missing > 0 else text
            self._token_texts[token_id] = text
        return text


def _space_marker(tokenizer: Tokenizer) -> str | None:
    """The character a SentencePiece-style decoder turns into a space ('▁': a Metaspace decoder, or a
    Replace of it), whose decoding of a lone word drops that space; None for any other decoder."""
    if tokenizer.decoder is None:
        return None
    found: list[str] = []

    def visit(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                found.append(node.get("replacement", "\u2581"))
            elif node.get("type") == "Replace" and node.get("content") == " ":
                pattern = node.get("pattern", {})
                if isinstance(pattern, dict) and len(pattern.get("String", "")) == 1:
                    found.append(pattern["String"])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(json.loads(tokenizer.decoder.__getstate__()))
    return found[0] if found else None


def _prime_ids(tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool) -> Sequence[int]:
    """The prompt suffix a stream is primed with (see _PRIME_MIN)."""
    if len(prompt_ids) <= _PRIME_MIN:
        return prompt_ids
    for n in range(_PRIME_MIN, min(len(prompt_ids) + 1, _PRIME_MAX)):
        suffix = list(prompt_ids[-n:])
        if "\ufffd" not in tokenizer.decode(suffix, skip_special_tokens=skip_special_tokens):
            return suffix
    return list(prompt_ids[-_PRIME_MIN:])


class _ByteStream:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        if 0 <= token_id < 256:
            return self._decoder.decode(bytes([token_id]))
        return ""


class ByteTokenizer:
    """UTF-8 bytes as token ids; an optional BOS id is prepended."""

    def __init__(self, bos_token_id: int | None = None) -> None:
        self.name = "bytes"
        self._bos = bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self._bos] if self._bos is not None and add_special_tokens else []) + ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Special ids (256 and up) have no text here, whether skipped or not."""
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")

    def stream(self, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()) -> TokenStream:
        """Bytes need no priming: a byte's text does not depend on what came before a whole character."""
        return _ByteStream()

    def token_text(self, token_id: int) -> str:
        """A byte's character (U+FFFD for a byte of a longer one); a special id has no text."""
        return self.decode([token_id])


def load_tokenizer(model: str, bos_token_id: int | None) -> TextTokenizer:
    """The checkpoint folder's tokenizer.json if there is one, else the byte-level fallback."""
    path = Path(model) / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path)
    return ByteTokenizer(bos_token_id)
