"""flashinfer plan staging and the graph/partition bookkeeping around it, on a CPU with fakes.

A plan's pinned buffer is not handed to another plan until the copy it queued has run (its event),
so re-planning a wrapper while the GPU is behind never rewrites a schedule still to be copied; the
pool grows instead of waiting, and waits only at its limit. The decode graphs refuse captures past
their budget (the pass then runs eagerly) instead of failing the worker. Partitions are keyed by the
decode SM count they realised, and a failed build destroys what it built.
"""

from __future__ import annotations

import pytest
import torch

from dataplane.attention.plan_staging import INT_ATTR, PIN_ATTR, PlanStaging
from dataplane.graphs import DecodeGraphs
from dataplane.partition_menu import Split
from dataplane.partitions import Partition, PartitionSet


class FakeEvent:
    """A CUDA event stand-in: done when the test says the GPU got past it."""

    made: list[FakeEvent] = []

    def __init__(self) -> None:
        self.recorded = False
        self.done = False
        self.synced = False
        FakeEvent.made.append(self)

    def record(self) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synced = True
        self.done = True


class FakeWrapper:
    """Records which pinned buffer each plan() staged its schedule in."""

    def __init__(self, nbytes: int = 64) -> None:
        setattr(self, INT_ATTR, torch.empty(nbytes, dtype=torch.uint8))
        setattr(self, PIN_ATTR, torch.empty(nbytes, dtype=torch.uint8))
        self.staged: list[int] = []
        self.args: list[tuple] = []

    def plan(self, *args: object, **kwargs: object) -> str:
        buffer = getattr(self, PIN_ATTR)
        buffer.fill_(len(self.staged))  # what flashinfer does: the schedule is written here
        self.staged.append(buffer.data_ptr())
        self.args.append((args, kwargs))
        return "plan info"


@pytest.fixture
def staging() -> PlanStaging:
    FakeEvent.made.clear()
    return PlanStaging(max_buffers=3, event_factory=FakeEvent,
                       allocate=lambda n: torch.empty(n, dtype=torch.uint8))


def test_a_buffer_is_not_reused_while_its_copy_is_queued(staging: PlanStaging) -> None:
    wrapper = FakeWrapper()
    assert staging.plan(wrapper, 1, 2, non_blocking=True) == "plan info"
    assert wrapper.args[0] == ((1, 2), {"non_blocking": True})
    first = wrapper.staged[0]
    staging.plan(wrapper)  # the GPU has not copied the first plan yet
    assert wrapper.staged[1] != first and staging.allocated == 2 and staging.in_flight == 2
    assert all(e.recorded for e in FakeEvent.made) and staging.waits == 0


def test_a_buffer_is_reused_once_its_copy_ran(staging: PlanStaging) -> None:
    wrapper, other = FakeWrapper(), FakeWrapper()
    staging.plan(wrapper)
    FakeEvent.made[0].done = True
    staging.plan(other)  # any wrapper may take a free buffer of its size
    assert other.staged[0] == wrapper.staged[0] and staging.allocated == 1
    assert staging.in_flight == 1


def test_the_pool_waits_for_the_oldest_copy_only_at_its_limit(staging: PlanStaging) -> None:
    wrapper = FakeWrapper()
    for _ in range(3):
        staging.plan(wrapper)
    assert staging.waits == 0 and not any(e.synced for e in FakeEvent.made)
    staging.plan(wrapper)
    assert staging.waits == 1 and FakeEvent.made[0].synced and not FakeEvent.made[1].synced
    assert wrapper.staged[3] == wrapper.staged[0] and staging.allocated == 3


def test_buffers_are_matched_to_the_wrappers_int_workspace_size(staging: PlanStaging) -> None:
    small, large = FakeWrapper(64), FakeWrapper(128)
    staging.plan(small)
    FakeEvent.made[0].done = True
    staging.plan(large)
    assert getattr(large, PIN_ATTR).nbytes == 128 and staging.allocated == 2


def test_a_failed_plan_still_returns_its_buffer_after_the_event(staging: PlanStaging) -> None:
    class Failing(FakeWrapper):
        def plan(self, *args: object, **kwargs: object) -> str:
            raise ValueError("bad plan")

    with pytest.raises(ValueError, match="bad plan"):
        staging.plan(Failing())
    FakeEvent.made[0].done = True
    wrapper = FakeWrapper()
    staging.plan(wrapper)
    assert staging.allocated == 1


def test_the_pool_needs_a_buffer() -> None:
    with pytest.raises(ValueError, match="max_buffers"):
        PlanStaging(max_buffers=0)


def _graphs(max_graphs: int) -> tuple[DecodeGraphs, list[tuple]]:
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.max_graphs, graphs._graphs, graphs.over_budget = max_graphs, {}, 0
    captured: list[tuple] = []

    def capture(key: object, stream: object, size: int, split: bool) -> None:
        captured.append((key, size, split))
        graphs._graphs[(key, size, split)] = (None, None)

    graphs._capture = capture  # type: ignore[method-assign]
    return graphs, captured


def test_graphs_past_the_budget_are_refused_not_fatal() -> None:
    graphs, captured = _graphs(max_graphs=2)
    assert graphs.ensure(16, None, 32) and graphs.ensure(16, None, 64)
    assert graphs.ensure(16, None, 32)  # captured already: nothing new
    assert not graphs.ensure(24, None, 32) and graphs.over_budget == 1
    assert captured == [(16, 32, False), (16, 64, False)]


def test_a_bucket_and_its_twin_are_captured_together_or_not_at_all() -> None:
    graphs, captured = _graphs(max_graphs=2)
    size = next(s for s in range(1, 64) if len(DecodeGraphs.variants("full", s)) == 2)
    assert graphs.ensure(24, None, 1)
    assert not graphs.ensure("full", None, size) and [c[:2] for c in captured] == [(24, 1)]
    graphs.max_graphs = 3
    assert graphs.ensure("full", None, size) and len(captured) == 3


class FakeDriver:
    def __init__(self) -> None:
        self.destroyed: list[object] = []

    def cuStreamDestroy(self, stream: object) -> None:  # noqa: N802 - the driver API's name
        self.destroyed.append(stream)

    def cuGreenCtxDestroy(self, ctx: object) -> None:  # noqa: N802
        self.destroyed.append(ctx)


def _partition(decode: int, realised: int, tag: str) -> Partition:
    return Partition(Split(decode, 132 - decode), None, None, realised, 132 - realised,  # type: ignore[arg-type]
                     [(f"{tag}-dctx", f"{tag}-dstream"), (f"{tag}-pctx", f"{tag}-pstream")])


def _partition_set(built: dict[int, Partition]) -> PartitionSet:
    ps = PartitionSet.__new__(PartitionSet)
    ps._drv, ps.partitions = FakeDriver(), {}
    ps._build = lambda split: built[split.decode_sms]  # type: ignore[method-assign]
    return ps


def test_partitions_are_keyed_by_the_decode_sms_they_realised() -> None:
    built = {16: _partition(16, 16, "a"), 20: _partition(20, 24, "b"), 24: _partition(24, 24, "c")}
    ps = _partition_set(built)
    ps._build_all([Split(16, 116), Split(20, 112), Split(24, 108)])
    assert sorted(ps.partitions) == [16, 24] and ps.get(24) is built[20]
    assert ps.describe() == [(116, 16), (108, 24)]  # what WorkerReady advertises: plans ask for these
    assert ps._drv.destroyed == ["c-dstream", "c-dctx", "c-pstream", "c-pctx"]  # the duplicate
    with pytest.raises(ValueError, match="no partition with 20 decode SMs"):
        ps.get(20)


def test_a_failed_build_destroys_the_partitions_built_before() -> None:
    built = {16: _partition(16, 16, "a")}
    ps = _partition_set(built)
    with pytest.raises(KeyError):
        ps._build_all([Split(16, 116), Split(32, 100)])
    assert ps.partitions == {} and ps._drv.destroyed == ["a-dstream", "a-dctx", "a-pstream", "a-pctx"]

