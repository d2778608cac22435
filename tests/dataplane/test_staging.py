"""positions_and_slots against the per-token definition, on random mixes of decodes and chunks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.staging import VECTOR_MIN_TOKENS, positions_and_slots


def naive(spans: list[tuple[int, int, list[int]]], bs: int) -> tuple[list[int], list[int]]:
    pos = [p for start, end, _ in spans for p in range(start, end)]
    slots = [table[p // bs] * bs + p % bs for start, end, table in spans for p in range(start, end)]
    return pos, slots


@st.composite
def spans(draw: st.DrawFn) -> tuple[list[tuple[int, int, list[int]]], int]:
    bs = draw(st.sampled_from([1, 4, 16]))
    out = []
    for _ in range(draw(st.integers(0, 8))):
        start = draw(st.integers(0, 300))
        n = draw(st.one_of(st.just(1), st.integers(1, 3 * VECTOR_MIN_TOKENS)))
        table = draw(st.lists(st.integers(0, 10_000), min_size=-(-(start + n) // bs), max_size=-(-(start + n) // bs)))
        out.append((start, start + n, table))
    return out, bs


@settings(max_examples=200, deadline=None)
@given(case=spans())
def test_matches_the_per_token_definition(case: tuple[list[tuple[int, int, list[int]]], int]) -> None:
    items, bs = case
    pos, slots = positions_and_slots(items, bs)
    assert pos.dtype.name == slots.dtype.name == "int64"
    assert (pos.tolist(), slots.tolist()) == naive(items, bs)
