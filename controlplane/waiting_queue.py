"""The waiting queue of the scheduler under `scheduling_policy="priority"`: sequences in the order
they are to be admitted, by (priority, arrival), lower first.

It offers the part of `collections.deque`'s interface the scheduler uses (`append`, `appendleft`,
`popleft`, `[0]`, `remove`, iteration, `len`), so the `fcfs` policy keeps a plain deque. Under this
one both appends insert a sequence where its key puts it: a preempted sequence goes back before the
ones of its priority that arrived after it, as in fcfs. It orders; it must not admit or allocate.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterable, Iterator
from typing import Protocol

from controlplane.sequence import Sequence


def priority_key(seq: Sequence) -> tuple[int, int]:
    """Lower first: the priority, then the arrival order (sequence ids grow with arrival)."""
    return seq.priority, seq.seq_id


def _reverse_key(seq: Sequence) -> tuple[int, int]:
    return -seq.priority, -seq.seq_id


class WaitingQueue(Protocol):
    """What the scheduler needs of its waiting queue (`collections.deque` has it)."""

    def append(self, seq: Sequence, /) -> None: ...
    def appendleft(self, seq: Sequence, /) -> None: ...
    def popleft(self) -> Sequence: ...
    def remove(self, seq: Sequence, /) -> None: ...
    def __getitem__(self, index: int, /) -> Sequence: ...
    def __iter__(self) -> Iterator[Sequence]: ...
    def __len__(self) -> int: ...


class PriorityWaitingQueue:
    """Sequences by `priority_key`. Kept as a list sorted the other way round, so the head is the
    list's last item and admitting it is O(1); an insertion is a bisection and a list insert, O(n)
    moves for the at most `--max-queued-requests` sequences waiting."""

    def __init__(self, seqs: Iterable[Sequence] = ()) -> None:
        self._items: list[Sequence] = sorted(seqs, key=_reverse_key)

    def append(self, seq: Sequence) -> None:
        insort(self._items, seq, key=_reverse_key)

    appendleft = append  # the key, not the end, says where a sequence goes

    def popleft(self) -> Sequence:
        if not self._items:
            raise IndexError("pop from an empty waiting queue")
        return self._items.pop()

    def remove(self, seq: Sequence) -> None:
        for i in range(len(self._items) - 1, -1, -1):  # identity: sequences compare by value
            if self._items[i] is seq:
                del self._items[i]
                return
        raise ValueError(f"seq {seq.seq_id} is not waiting")

    def __getitem__(self, index: int) -> Sequence:
        if index != 0:
            raise IndexError("only the head of the waiting queue ([0]) can be read")
        if not self._items:
            raise IndexError("the waiting queue is empty")
        return self._items[-1]

    def __iter__(self) -> Iterator[Sequence]:
        return reversed(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)
