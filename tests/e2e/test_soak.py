"""Soak: concurrent streams with random cancels, Aborts, short deadlines and invalid requests, and a
kill -9 of the data plane midway (the supervisor restarts it). Every call must end with a final
status from its allowed set; afterwards no request, KV block, file descriptor or process is leaked.

Runs `--soak-seconds` (default 60, or $DUETSERVE_SOAK_SECONDS). The data-plane command is a
parameter (`$DUETSERVE_SOAK_WORKER`, a module run as `python -m MODULE` with the data plane's flags),
so a simulated data plane can replace the tiny CPU model. Traffic stays on 127.0.0.1 and ipc://.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.launcher import dataplane_args
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
from controlplane.server import ControlPlane
from shared.config import DataplaneConfig, SchedulerConfig, ServerConfig

WORKER_MODULE = os.environ.get("DUETSERVE_SOAK_WORKER", "dataplane")
CLIENTS = 12
CALL_BOUND_S = 90.0  # no call may take longer than this: a hang fails the soak
FD_SLACK = 12
Code = grpc.StatusCode
COMMON = {Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED}  # data plane down, or queue full
ALLOWED = {
    "normal": {"stop", "length"} | COMMON,
    "cancel": {"stop", "length", Code.CANCELLED} | COMMON,
    "abort": {"stop", "length", "abort"} | COMMON,
    "deadline": {"stop", "length", Code.DEADLINE_EXCEEDED} | COMMON,
    "invalid": {Code.INVALID_ARGUMENT, Code.UNAVAILABLE},
}


def worker_command(config: DataplaneConfig) -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE, *dataplane_args(config), "--log-level", "ERROR",
            "--parent-pid", str(os.getpid())]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def our_dataplanes(endpoint: str) -> list[int]:
    """Processes (zombies included) started for this endpoint by this process."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if endpoint in cmd and f"--parent-pid\0{os.getpid()}" in cmd:
            found.append(int(pid))
    return found


@dataclass
class Tally:
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)
    ok_after_restart: int = 0
    restarted: bool = False

    def record(self, kind: str, outcome: object) -> None:
        self.outcomes[(kind, outcome)] += 1
        if outcome not in ALLOWED[kind]:
            self.bad.append(f"{kind}: {outcome}")
        if self.restarted and outcome in ("stop", "length", "abort"):
            self.ok_after_restart += 1


SOAK_TAG = '{"structures": [{"begin": "x(", "schema": {"type": "integer"}, "end": ")"}], "triggers": ["x"]}'


def random_request(rng: random.Random, kind: str, rid: str) -> pb.GenerateRequest:
    if kind == "invalid":
        return rng.choice([pb.GenerateRequest(), pb.GenerateRequest(text="hi", max_tokens=0),
                           pb.GenerateRequest(token_ids=pb.TokenIds(ids=[9999])),
                           # two kinds at once: refused by the cheap checks (a grammar that only its compile
                           # refuses may meet a full queue first, RESOURCE_EXHAUSTED, as a prompt its encode would)
                           pb.GenerateRequest(text="hi", structured_outputs=pb.StructuredOutputs(regex="(",
                                                                                               json_object=True))])
    long = kind in ("cancel", "abort", "deadline")
    request = pb.GenerateRequest(
        request_id=rid, token_ids=pb.TokenIds(ids=[rng.randrange(3, 250) for _ in range(rng.randint(1, 120))]),
        max_tokens=rng.randint(100, 400) if long else rng.randint(1, 48), ignore_eos=rng.random() < 0.7,
        temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(1 << 30))
    if rng.random() < 0.2:  # a fifth follow a grammar: their steps' masks follow the plans
        request.structured_outputs.CopyFrom(rng.choice([pb.StructuredOutputs(regex="[a-z ]{1,300}"),
                                                        pb.StructuredOutputs(json_object=True),
                                                        pb.StructuredOutputs(structural_tag=SOAK_TAG)]))
    return request


async def one_call(stub: pb_grpc.GenerationStub, rng: random.Random, kind: str, rid: str) -> object:
    """Run one call of `kind`; its final outcome: a finish_reason or a status code."""
    timeout = rng.uniform(0.05, 0.5) if kind == "deadline" else CALL_BOUND_S
    call = stub.Generate(random_request(rng, kind, rid), timeout=timeout)
    stop_after = rng.randint(1, 8)
    seen = 0
    try:
        while (response := await call.read()) != grpc.aio.EOF:
            seen += 1
            if response.finish_reason:
                return response.finish_reason
            if seen == stop_after and kind == "cancel":
                call.cancel()
                return Code.CANCELLED
            if seen == stop_after and kind == "abort":
                await stub.Abort(pb.AbortRequest(request_id=rid), timeout=CALL_BOUND_S)
        return "ended without a final message"
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def client_loop(stub: pb_grpc.GenerationStub, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*{"normal": 40, "cancel": 20, "abort": 15, "deadline": 15, "invalid": 10}.items())
    n = 0
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        outcome = await asyncio.wait_for(one_call(stub, rng, kind, f"c{seed}-{n}"), CALL_BOUND_S + 10)
        tally.record(kind, outcome)
        n += 1
        if outcome in COMMON:
            await asyncio.sleep(rng.uniform(0.05, 0.2))  # back off like a polite client


async def watch_invariants(plane: ControlPlane, stop: asyncio.Event) -> int:
    checks = 0
    while not stop.is_set():
        if plane.engine.scheduler is not None:
            plane.engine.scheduler.check_invariants()
            checks += 1
        await asyncio.sleep(0.05)
    return checks


async def wait_serving(channel: grpc.aio.Channel, timeout_s: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while (await health.Check(health_pb2.HealthCheckRequest())).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "the data plane did not come back"
        await asyncio.sleep(0.05)


async def test_soak(pytestconfig: pytest.Config) -> None:
    seconds = pytestconfig.getoption("--soak-seconds")
    workdir = tempfile.mkdtemp(prefix="soak-")
    endpoint = f"ipc://{workdir}/dp.sock"
    dataplane = DataplaneConfig(model="tiny", endpoint=endpoint, device="cpu", num_kv_blocks=64, block_size=16)
    config = ServerConfig(
        port=0, dataplane_endpoint=endpoint, handshake_timeout_s=120.0, step_timeout_s=30.0,
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
        max_queued_requests=3, max_queued_tokens=1500, shutdown_grace_s=5.0, restart_backoff_s=0.2,
    )
    plane = ControlPlane(config, "tiny", spawn=lambda: subprocess.Popen(worker_command(dataplane)))
    tally, stop_watch = Tally(), asyncio.Event()
    try:
        await plane.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            await one_call(stub, random.Random(0), "normal", "warm-up")
            fds_before = open_fds()
            watcher = asyncio.create_task(watch_invariants(plane, stop_watch))
            until = time.monotonic() + seconds
            clients = [asyncio.create_task(client_loop(stub, seed, until, tally)) for seed in range(CLIENTS)]
            await asyncio.sleep(seconds / 2)
            assert plane.supervisor is not None and plane.supervisor.child is not None
            os.kill(plane.supervisor.child.pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            await wait_serving(channel, 120)
            tally.restarted = True
            await asyncio.gather(*clients)
            stop_watch.set()
            checks = await watcher
            deadline = time.monotonic() + 30
            while plane.engine.num_live_requests or plane.engine.scheduler.seqs:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "requests still live after every call ended"
                await asyncio.sleep(0.05)
            scheduler = plane.engine.scheduler
            assert scheduler is not None
            scheduler.check_invariants()
            assert scheduler.allocator.num_free == scheduler.allocator.num_blocks
            fds_after = open_fds()
        print(f"\nsoak {seconds:.0f} s: {sum(tally.outcomes.values())} calls, {checks} invariant checks, "
              f"{plane.supervisor.restarts} restart(s), fds {fds_before} -> {fds_after}")
        for (kind, outcome), count in sorted(tally.outcomes.items(), key=str):
            print(f"  {kind:9s} {getattr(outcome, 'name', outcome)!s:20s} {count}")
        assert not tally.bad, f"calls ended outside their allowed set: {collections.Counter(tally.bad)}"
        assert plane.supervisor.restarts == 1 and plane.engine.num_reconnects == 1
        assert tally.outcomes[("normal", Code.UNAVAILABLE)] + tally.outcomes[("cancel", Code.UNAVAILABLE)] \
            + tally.outcomes[("abort", Code.UNAVAILABLE)] + tally.outcomes[("deadline", Code.UNAVAILABLE)] > 0
        assert tally.ok_after_restart > 0, "nothing completed after the restart"
        assert abs(fds_after - fds_before) <= FD_SLACK, (fds_before, fds_after)
    finally:
        stop_watch.set()
        await plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert not our_dataplanes(endpoint), "a data-plane process outlived the soak"
