"""Test factories shared by the suites: tokenizer files, sequences, step results.

Test-only helpers; nothing here may be imported by the planes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "DuetServe serves large language models on one GPU.",
    "Prefill and decode share the streaming multiprocessors.",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    print('hello, world')\n",
    "Stop strings end a completion; 日本語 and émojis 🙂 are bytes too.",
]


def write_tokenizer(folder: str | Path, vocab_size: int, bos_id: int = 1, eos_id: int = 2) -> Path:
    """Train a byte-level BPE of exactly `vocab_size` ids into folder/tokenizer.json.

    Ids 0, 1, 2 are <pad>, <s>, </s> (so bos/eos match the tiny checkpoints); BOS is prepended.
    """
    assert (bos_id, eos_id) == (1, 2), "the special-token layout is fixed"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    path = Path(folder) / "tokenizer.json"
    tok.save(str(path))
    if tok.get_vocab_size() > vocab_size:
        raise AssertionError(f"tokenizer has {tok.get_vocab_size()} ids, model {vocab_size}")
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path
