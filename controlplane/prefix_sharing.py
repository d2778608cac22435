"""What one sequence shares through the prefix cache: the cached blocks it may be admitted with, and
the blocks of its own that a step's result has confirmed and that may be registered.

The scheduler calls these; they read and set the sequence's prefix-caching fields (`_match`,
`_cache_blocks`, `_cache_parent`, `_kv_confirmed`, `_admitted_tokens`, `_prompt_bytes`) and talk to a
`PrefixCachingAllocator`. No queues, no plans, no I/O here.
"""

from __future__ import annotations

from controlplane.prefix_cache import PrefixCachingAllocator, token_bytes
from controlplane.sequence import Sequence


def sequence_bytes(seq: Sequence, num_tokens: int) -> bytes:
    """At least the sequence's first `num_tokens` tokens as the prefix index keys them (the prompt's
    bytes are made once and kept)."""
    if num_tokens <= seq._num_prompt:
        if not seq._prompt_bytes:
            seq._prompt_bytes = token_bytes(seq.prompt_token_ids)
        return seq._prompt_bytes
    return token_bytes(seq.all_token_ids())


def admission_match(cache: PrefixCachingAllocator, seq: Sequence) -> tuple[list[int], int]:
    """The cached blocks a waiting sequence's tokens start with (a fresh list; at least its last token
    is left to compute; none for a request that wants prompt logprobs) and the entry id they end in. A match made at the cache's current epoch is
    reused: a queue head waiting for free blocks is not matched again while the index stays the same."""
    if seq.needs_prompt_logprobs:
        return [], 0  # every prompt position's logits are wanted: nothing may be skipped
    epoch, cached, parent = seq._match
    if epoch != cache.epoch:
        num_tokens = seq._num_prompt + len(seq.output_token_ids)
        cached, parent = cache.match(sequence_bytes(seq, num_tokens), (num_tokens - 1) // cache.block_size)
        seq._match = (cache.epoch, cached, parent)
    return list(cached), parent


def note_admission(seq: Sequence, hit_blocks: int, parent: int, block_size: int) -> None:
    """A sequence admitted with `hit_blocks` cached blocks (ending in entry `parent`): its KV is
    computed and confirmed that far, and that far it is in the index already."""
    hit = hit_blocks * block_size
    seq.num_computed_tokens = seq._kv_confirmed = hit
    seq._cache_blocks, seq._cache_parent = hit_blocks, parent
    seq._admitted_tokens = seq._num_prompt + len(seq.output_token_ids)
    if not seq.num_preemptions:
        seq.num_cached_tokens = hit


def confirm(cache: PrefixCachingAllocator, seq: Sequence, computed: int) -> None:
    """A step's result says the sequence's KV is computed up to `computed` tokens: register its full
    blocks that far."""
    if computed > seq._kv_confirmed:
        seq._kv_confirmed = computed
    register_confirmed(cache, seq)


def register_confirmed(cache: PrefixCachingAllocator, seq: Sequence) -> None:
    """Register the sequence's full blocks whose tokens are known and whose KV a result confirmed: up
    to its confirmed chunks, or, once it decodes, up to its last output that arrived (the pass that
    sampled it wrote the KV of the token before)."""
    size, done = cache.block_size, seq._cache_blocks
    known = seq._num_prompt + len(seq.output_token_ids)
    confirmed = seq._kv_confirmed
    if confirmed >= seq._admitted_tokens:  # it decodes: the arrived outputs tell, not the planned passes
        confirmed = known - 1
    full = min(confirmed, known, len(seq.block_ids) * size) // size
    if full <= done:
        return
    seq._cache_parent = cache.register(seq.block_ids, sequence_bytes(seq, full * size), done, full,
                                       seq._cache_parent)
    seq._cache_blocks = full
