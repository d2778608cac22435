"""The engine's step loop and the API's tasks: when a result leaves no step in flight (steps one at a time),
the next step is sent before the API's tasks run, so they write the streams while the GPU computes it;
with a step still in flight they run first, as before; the loop goes idle when there is nothing to plan.
A step in flight whose token masks follow gets them right after the result before it, ahead of the API's
tasks and of the next plan.
Stubs stand in for the scheduler, the data-plane client and the observer; the loop is the engine's own."""

from __future__ import annotations

import asyncio
import types
from collections import deque

import pytest

from controlplane.engine import Engine


class StubScheduler:
    """Plans `steps` numbered steps; with `one_at_a_time_when_busy` none while one is in flight (as the
    scheduler does while a structured output's token is out)."""

    def __init__(self, max_inflight: int, steps: int, one_at_a_time_when_busy: bool = False,
                 masks_follow: bool = False) -> None:
        self.max_inflight = max_inflight
        self.inflight: deque[int] = deque()
        self.left = steps
        self.busy_rule = one_at_a_time_when_busy
        self.masks_follow = masks_follow  # every step planned with one in flight: its masks follow
        self.masks_due: set[int] = set()
        self.next_id = 0

    def schedule(self) -> types.SimpleNamespace | None:
        if self.left <= 0 or (self.busy_rule and self.inflight):
            return None
        if self.masks_due:
            raise AssertionError("a plan before the masks of the step in flight")
        self.left -= 1
        self.next_id += 1
        if self.masks_follow and self.inflight:
            self.masks_due.add(self.next_id)
        self.inflight.append(self.next_id)
        return types.SimpleNamespace(step_id=self.next_id)

    def update(self, result: int) -> list:
        self.inflight.popleft()
        return []

    def token_masks_due(self) -> types.SimpleNamespace | None:
        if self.inflight and self.inflight[0] in self.masks_due:
            self.masks_due.discard(self.inflight[0])
            return types.SimpleNamespace(step_id=self.inflight[0])
        return None


class StubClient:
    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.idle = False

    async def send_plan(self, plan: types.SimpleNamespace) -> None:
        self.log.append(("send", plan.step_id))

    async def send_masks(self, masks: types.SimpleNamespace) -> None:
        self.log.append(("masks", masks.step_id))

    async def receive_result(self, step_id: int, timeout: float, on_progress: object) -> int:
        await asyncio.sleep(0.001)  # the GPU's step: the API's tasks run meanwhile
        self.log.append(("result", step_id))
        return step_id

    async def wait(self, wakeup: asyncio.Event) -> None:
        self.log.append(("idle",))
        self.idle = True
        await wakeup.wait()


def run_loop(scheduler: StubScheduler) -> list[tuple]:
    log: list[tuple] = []
    client = StubClient(log)
    observer = types.SimpleNamespace(step_planned=lambda plan, *_: plan, idle=lambda *_: None,
                                     step_done=lambda *_: None)
    engine = types.SimpleNamespace(scheduler=scheduler, observer=observer, client=client,
                                   _wakeup=asyncio.Event(), num_steps=0, step_timeout_s=5.0,
                                   _emit=lambda _: log.append(("emit",)))  # the streams written

    async def main() -> None:
        loop = asyncio.create_task(Engine._step_loop(engine))  # type: ignore[arg-type]

        async def api() -> None:
            while True:
                log.append(("api",))
                await asyncio.sleep(0)

        tasks = asyncio.create_task(api())
        for _ in range(5000):  # at most ~10 s
            if client.idle:
                break
            await asyncio.sleep(0.002)
        loop.cancel()
        tasks.cancel()
        await asyncio.gather(loop, tasks, return_exceptions=True)

    asyncio.run(main())
    return log


def after_each_result(log: list[tuple]) -> list[tuple[int, str]]:
    """For each result: the API turns before the loop's next send or idle, and which it was."""
    out = []
    for i, entry in enumerate(log):
        if entry[0] == "result":
            rest = [e for e in log[i + 1:] if e[0] in ("send", "idle", "api")]
            turns = next((j for j, e in enumerate(rest) if e[0] != "api"), len(rest))
            out.append((turns, rest[turns][0] if turns < len(rest) else "end"))
    return out


@pytest.mark.parametrize("max_inflight, busy_rule", [(1, False), (2, True)])
def test_steps_one_at_a_time_send_the_next_before_the_api_runs(max_inflight: int, busy_rule: bool) -> None:
    log = run_loop(StubScheduler(max_inflight, 12, busy_rule))
    gaps = after_each_result(log)
    assert len(gaps) == 12 and sum(1 for e in log if e[0] == "send") == 12
    assert all(turns == 0 and then == "send" for turns, then in gaps[:-1])  # the GPU is never left waiting
    assert gaps[-1] == (1, "idle")  # nothing left: the API runs, then the loop waits
    sends = [i for i, e in enumerate(log) if e[0] == "send"]
    assert all(any(e[0] == "api" for e in log[a:b]) for a, b in zip(sends, sends[1:]))  # the API runs every step


def test_with_a_step_in_flight_the_api_runs_before_the_next_plan() -> None:
    log = run_loop(StubScheduler(2, 12))
    gaps = after_each_result(log)
    assert len(gaps) == 12
    assert all(turns >= 1 for turns, _ in gaps[:-2])  # the next step is already at the data plane


def test_masks_that_follow_go_out_right_after_the_result_before_them() -> None:
    log = run_loop(StubScheduler(2, 12, masks_follow=True))
    assert [e[1] for e in log if e[0] == "masks"] == list(range(2, 13))  # every step planned behind another
    for i, entry in enumerate(log):
        if entry[0] == "result" and entry[1] < 12:
            # before the streams are written, the API's tasks and the next plan
            assert log[i + 1: i + 3] == [("masks", entry[1] + 1), ("emit",)]
    sends = {e[1]: i for i, e in enumerate(log) if e[0] == "send"}
    masks = {e[1]: i for i, e in enumerate(log) if e[0] == "masks"}
    assert all(masks[s] < sends[s + 1] for s in masks if s + 1 in sends)
