"""Priority scheduling (`scheduling_policy="priority"`): the waiting queue's order, admission by
priority, preemption of the lowest-priority sequence, and random workloads against the simulated
runner with and without prefix caching."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.kv_blocks import BlockAllocator
from controlplane.prefix_cache import PrefixCachingAllocator
from controlplane.scheduler import Scheduler
from controlplane.sequence import FinishReason, Sequence
from controlplane.waiting_queue import PriorityWaitingQueue
from dataplane.sim import SimRunner
from shared.config import SchedulerConfig
from tests.controlplane.test_scheduler import EOS, VOCAB, drain, expected_tokens, make_seq, run_random_workload, step


def prio_seq(seq_id: int, priority: int, prompt_len: int = 8, max_tokens: int = 4) -> Sequence:
    seq = make_seq(seq_id, prompt_len, max_tokens)
    seq.priority = priority
    return seq


def prio_scheduler(num_blocks: int = 64, block_size: int = 4, budget: int = 32, max_seqs: int = 16,
                   caching: bool = False) -> tuple[Scheduler, SimRunner]:
    config = SchedulerConfig(max_num_seqs=min(max_seqs, budget), max_num_batched_tokens=budget,
                             scheduling_policy="priority",
                             enable_prefix_caching=caching)
    allocator = (PrefixCachingAllocator if caching else BlockAllocator)(num_blocks, block_size)
    sched = Scheduler(config, allocator, 10_000, frozenset({EOS}))
    return sched, SimRunner(num_blocks, block_size, VOCAB)


def test_the_queue_orders_by_priority_then_arrival() -> None:
    q = PriorityWaitingQueue()
    seqs = [prio_seq(i, p) for i, p in enumerate([5, 0, 5, -3, 0])]
    for s in seqs:
        q.append(s)
    assert [s.seq_id for s in q] == [3, 1, 4, 0, 2]
    assert q[0] is seqs[3] and len(q) == 5
    q.remove(seqs[4])
    q.appendleft(seqs[4])  # a preempted sequence goes back where its key puts it, not to the front
    assert [s.seq_id for s in q] == [3, 1, 4, 0, 2]
    assert [q.popleft().seq_id for _ in range(5)] == [3, 1, 4, 0, 2]
    assert not q
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(IndexError):
        q[0]
    with pytest.raises(ValueError, match="not waiting"):
        q.remove(seqs[0])


def test_the_queue_matches_a_sort_under_random_operations() -> None:
    rng = random.Random(7)
    q, shadow, next_id = PriorityWaitingQueue(), [], 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.5 or not shadow:
            s = prio_seq(next_id, rng.randint(-3, 3))
            next_id += 1
            q.append(s)
            shadow.append(s)
        elif op < 0.75:
            head = min(shadow, key=lambda s: (s.priority, s.seq_id))
            assert q.popleft() is head
            shadow.remove(head)
        else:
            victim = rng.choice(shadow)
            q.remove(victim)
            shadow.remove(victim)
        assert [s.seq_id for s in q] == [s.seq_id for s in sorted(shadow, key=lambda s: (s.priority, s.seq_id))]


def test_a_later_higher_priority_request_is_admitted_first() -> None:
    sched, runner = prio_scheduler(max_seqs=1)
    low, high = prio_seq(0, 10), prio_seq(1, -1)
    sched.add(prio_seq(2, 0, max_tokens=2))
    step(sched, runner)  # seq 2 runs alone (max_num_seqs=1)
    sched.add(low)
    sched.add(high)
    assert [s.seq_id for s in sched.waiting] == [1, 0]
    order = []
    while sched.has_work():
        plan, _ = step(sched, runner)
        order.extend(r.seq_id for r in plan.new_requests)
    assert order == [1, 0]
    for s in (low, high):
        assert s.output_token_ids == expected_tokens(s, 4)


def test_fcfs_admits_by_arrival_whatever_the_priority() -> None:
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=32)
    sched = Scheduler(config, BlockAllocator(64, 4), 10_000, frozenset({EOS}))
    runner = SimRunner(64, 4, VOCAB)
    for s in (prio_seq(0, 10), prio_seq(1, -1)):
        sched.add(s)
    order = []
    while sched.has_work():
        plan, _ = step(sched, runner)
        order.extend(r.seq_id for r in plan.new_requests)
    assert order == [0, 1]


def test_kv_pressure_preempts_the_lowest_priority_not_the_latest() -> None:
    """Three decodes that each need a new block with none free: under fcfs the latest admitted (2)
    would go first; here the lowest priority (0, admitted first) is preempted, then the next lowest."""
    sched, runner = prio_scheduler(num_blocks=3, block_size=4, budget=64)
    seqs = [prio_seq(0, 9, prompt_len=4, max_tokens=3), prio_seq(1, 0, prompt_len=4, max_tokens=3),
            prio_seq(2, 1, prompt_len=4, max_tokens=3)]
    for s in seqs:
        sched.add(s)
    step(sched, runner)  # all three prompts fit one block each: none free
    assert [s.seq_id for s in sched.running] == [1, 2, 0]
    plan, _ = step(sched, runner)
    assert [e.seq_id for e in plan.scheduled] == [1]  # 1 took 0's block, then 2 preempted itself
    assert [s.seq_id for s in sched.waiting] == [2, 0] and sched.num_preemptions == 2
    drain(sched, runner)
    for s in seqs:
        assert s.output_token_ids == expected_tokens(s, 3)


def test_an_abort_takes_a_sequence_out_of_the_priority_queue() -> None:
    sched, runner = prio_scheduler(max_seqs=1)
    seqs = [prio_seq(i, p) for i, p in enumerate([0, 3, 1])]
    for s in seqs:
        sched.add(s)
    step(sched, runner)
    assert sched.finish(2, FinishReason.ABORT) is seqs[2]
    assert [s.seq_id for s in sched.waiting] == [1]
    drain(sched, runner)
    assert seqs[1].output_token_ids == expected_tokens(seqs[1], 4)
    assert sched.allocator.num_free == 64


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(-2, 2)), min_size=1, max_size=14),
    num_blocks=st.integers(4, 40),
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 6),
    caching=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_priority_workloads_complete_with_the_same_tokens(
    specs: list[tuple[int, int, int]], num_blocks: int, budget: int, max_seqs: int, caching: bool, seed: int
) -> None:
    block_size = 4
    capacity = num_blocks * block_size
    specs = [(p, o, pr) for p, o, pr in specs if p + o <= capacity] or [(1, 1, 0)]
    sched, runner = prio_scheduler(num_blocks, block_size, budget, max_seqs, caching)
    seqs = [prio_seq(i, pr, p, o) for i, (p, o, pr) in enumerate(specs)]

    def sorted_by_priority(s: Scheduler) -> None:
        keys = [(q.priority, q.seq_id) for q in s.running]
        assert keys == sorted(keys)  # preemption takes the last: the lowest priority

    run_random_workload(sched, runner, seqs, random.Random(seed), abort_rate=0.05, after_step=sorted_by_priority)
