"""The API encodes prompts on worker threads while the event loop's streams detokenize with the same
tokenizer: every call borrows it shared (nothing reconfigures it, which is what makes the Rust
binding raise "Already borrowed"), so concurrent use is safe and gives the same ids as one thread."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from controlplane.tokenizer import HFTokenizer
from tests.factories import write_tokenizer


def test_concurrent_encodes_and_streams_agree_with_one_thread(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 300)
    tokenizer = HFTokenizer(tmp_path / "tokenizer.json")
    texts = [f"request {i}: " + "the quick brown fox jumps over the lazy dog " * (50 + 13 * i) for i in range(24)]
    expected = [tokenizer.encode(t) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(tokenizer.encode, t) for t in texts]
        streamed = []
        for ids in expected[:4]:  # meanwhile, streams decode on this thread
            stream = tokenizer.stream()
            streamed.append("".join(stream.step(t) for t in ids))
        got = [f.result() for f in futures]
        decoded = list(pool.map(tokenizer.decode, expected))
    assert got == expected
    assert decoded == [tokenizer.decode(ids) for ids in expected]
    assert streamed == [tokenizer.decode(ids) for ids in expected[:4]]
