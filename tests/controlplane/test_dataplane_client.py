"""The control plane's ZeroMQ client against a fake data plane: garbage frames are dropped
(hypothesis), a dropped connection or a silent peer raises DataplaneUnavailable promptly (mid-step
and idle), a wrong protocol version is refused, and sends never block on a missing peer."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.dataplane_client import DataplaneClient, DataplaneTimeout, DataplaneUnavailable
from shared.codec import ProtocolError, decode_to_control, encode
from shared.messages import (
    PROTOCOL_VERSION, DeviceDescription, ModelDescription, Pong, SeqOutput, StepPlan, StepProgress, StepResult,
    WorkerFatal, WorkerReady,
)

leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=16)
          | st.binary(max_size=16))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=16)
TAGS = ["hello", "plan", "shutdown", "ready", "progress", "result", "fatal", "bogus", ""]
tagged = st.builds(lambda tag, rest: {**rest, "type": tag}, st.sampled_from(TAGS),
                   st.dictionaries(st.sampled_from(["step_id", "protocol_version", "outputs", "reason", "model",
                                                    "scheduled", "failures", "x"]), values, max_size=4))


def _not_fatal(frame: bytes) -> bool:
    """A frame that happens to be a well-formed WorkerFatal is no garbage: the client rightly stops."""
    try:
        return not isinstance(decode_to_control(frame), WorkerFatal)
    except ProtocolError:
        return True


FRAMES = st.one_of(st.binary(max_size=300), values.map(msgspec.msgpack.encode),
                   tagged.map(msgspec.msgpack.encode)).filter(_not_fatal)


def ready(version: int = PROTOCOL_VERSION) -> WorkerReady:
    return WorkerReady(
        protocol_version=version, num_kv_blocks=8, block_size=16, max_model_len=128, attention_backend="none",
        model=ModelDescription(name="m", architecture="fake", vocab_size=32, num_layers=1, hidden_size=8,
                               intermediate_size=8, num_q_heads=1, num_kv_heads=1, head_dim=8,
                               max_position_embeddings=128, dtype="float32"),
        device=DeviceDescription(kind="cpu", name="cpu"),
    )


def with_peer(body: Callable[[DataplaneClient, zmq.asyncio.Socket], Awaitable[None]]) -> None:
    """Run `body(client, fake_worker)` with a fresh context, a bound fake worker and a connected client."""

    async def main() -> None:
        context = zmq.asyncio.Context()
        endpoint = f"ipc://{tempfile.mkdtemp(prefix='dpc-')}/s"
        peer = context.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.bind(endpoint)
        client = DataplaneClient(endpoint, context)
        client.connect()
        try:
            await body(client, peer)
        finally:
            client.close()
            peer.close(linger=0)
            context.term()

    asyncio.run(main())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAMES, max_size=6))
def test_garbage_frames_are_dropped(frames: list[bytes]) -> None:
    async def body(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        async def worker() -> None:
            await peer.recv()
            for frame in frames:
                await peer.send(frame)
            await peer.send(encode(StepResult(step_id=7)))

        serving = asyncio.create_task(worker())
        result = await client.run_step(StepPlan(step_id=7), timeout_s=10)
        assert result.step_id == 7
        await serving

    with_peer(body)


def test_dropped_connection_raises_mid_step_and_idle() -> None:
    async def mid_step(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        await peer.send(encode(ready()))  # connect first: the ready frame arrives once connected
        assert isinstance(await client.receive(10), WorkerReady)
        step = asyncio.create_task(client.run_step(StepPlan(step_id=1), timeout_s=60))
        await peer.recv()
        started = time.monotonic()
        peer.close(linger=0)
        with pytest.raises(DataplaneUnavailable, match="connection dropped"):
            await step
        assert time.monotonic() - started < 2.0

    async def idle(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        await peer.send(encode(ready()))
        assert isinstance(await client.receive(10), WorkerReady)
        never = asyncio.Event()
        waiting = asyncio.create_task(client.wait(never))
        await asyncio.sleep(0.1)
        peer.close(linger=0)
        with pytest.raises(DataplaneUnavailable, match="connection dropped"):
            await asyncio.wait_for(waiting, 2.0)

    with_peer(mid_step)
    with_peer(idle)


def test_silent_peer_times_out_and_lost_mark_interrupts() -> None:
    async def body(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        with pytest.raises(DataplaneTimeout, match="step 3 took longer than 0.3 s"):
            await client.run_step(StepPlan(step_id=3), timeout_s=0.3)
        step = asyncio.create_task(client.run_step(StepPlan(step_id=4), timeout_s=60))
        await asyncio.sleep(0.05)
        client.mark_lost("the process exited")
        with pytest.raises(DataplaneUnavailable, match="the process exited"):
            await asyncio.wait_for(step, 2.0)
        client.reset()  # a fresh socket is usable again

        async def answer_hellos() -> None:
            while True:  # plans sent on the old socket may still arrive first
                if msgspec.msgpack.decode(await peer.recv()).get("type") == "hello":
                    await peer.send(encode(ready()))  # may go to the old connection: Hello comes again

        answering = asyncio.create_task(answer_hellos())
        assert isinstance(await client.handshake(10), WorkerReady)
        answering.cancel()

    with_peer(body)


def test_wrong_protocol_version_is_refused() -> None:
    async def body(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        async def worker() -> None:
            await peer.recv()
            await peer.send(encode(StepResult(step_id=99)))  # stale, dropped
            await peer.send(encode(ready(PROTOCOL_VERSION + 1)))

        serving = asyncio.create_task(worker())
        with pytest.raises(DataplaneUnavailable, match="protocol version mismatch"):
            await client.handshake(10)
        await serving

    with_peer(body)


def test_send_never_blocks_without_a_peer() -> None:
    async def main() -> None:
        client = DataplaneClient(f"ipc://{tempfile.mkdtemp(prefix='dpc-')}/nobody")
        client.connect()
        started = time.monotonic()
        try:
            with pytest.raises(DataplaneUnavailable, match="send queue full"):
                for _ in range(10_000):
                    await client.shutdown()
        finally:
            client.close()
        assert time.monotonic() - started < 5.0

    asyncio.run(main())


def test_hello_is_repeated_when_an_answer_goes_missing() -> None:
    async def body(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        async def worker() -> None:
            await peer.recv()  # the first Hello's answer is "lost"
            await peer.recv()
            await peer.send(encode(ready()))

        serving = asyncio.create_task(worker())
        assert isinstance(await client.handshake(10), WorkerReady)
        await serving

    with_peer(body)


def test_progress_goes_to_the_callback_or_into_the_result() -> None:
    """StepProgress before a StepResult: handed to `on_progress`, or (without one) folded into the
    result, early tokens first; a progress message of another step is not mixed in."""
    early = StepProgress(step_id=5, outputs=[SeqOutput(seq_id=1, token_ids=[7, 8]), SeqOutput(seq_id=2, token_ids=[3])])
    other = StepProgress(step_id=4, outputs=[SeqOutput(seq_id=1, token_ids=[99])])
    final = StepResult(step_id=5, outputs=[SeqOutput(seq_id=1, token_ids=[9]), SeqOutput(seq_id=3, token_ids=[4])])

    async def body(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        async def worker() -> None:
            for _ in range(2):
                await peer.recv()
                for message in (other, early, final):
                    await peer.send(encode(message))

        serving = asyncio.create_task(worker())
        folded = await client.run_step(StepPlan(step_id=5), timeout_s=10)
        assert {o.seq_id: o.token_ids for o in folded.outputs} == {1: [7, 8, 9], 2: [3], 3: [4]}
        seen: list[StepProgress] = []
        await client.send_plan(StepPlan(step_id=5))
        result = await client.receive_result(5, 10, seen.append)
        assert seen == [early] and result == final
        await serving

    with_peer(body)


def test_an_idle_client_pings_and_finds_a_hung_data_plane() -> None:
    """While idle the client Pings every second: a data plane that answers stays attached; one that stops
    answering (hung, its connection still open) is lost after ping_timeout_s; a refusal for now
    (another control plane attached) makes the handshake say Hello again."""
    async def body(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        client.ping_timeout_s = 1.5

        async def answer(pings: list[int], until: float) -> None:
            while time.monotonic() < until:
                if await peer.poll(50):
                    message = msgspec.msgpack.decode(await peer.recv())
                    if message.get("type") == "ping":
                        pings.append(message.get("nonce", 0))
                        await peer.send(encode(Pong(nonce=message.get("nonce", 0))))

        await peer.send(encode(ready()))
        assert isinstance(await client.receive(10), WorkerReady)
        never, pings = asyncio.Event(), []  # type: ignore[var-annotated]
        answering = asyncio.create_task(answer(pings, time.monotonic() + 3.0))
        waiting = asyncio.create_task(client.wait(never))
        await answering  # 3 s answered: still attached
        assert len(pings) >= 2 and not waiting.done()
        with pytest.raises(DataplaneUnavailable, match="answered no ping for 1.5 s"):  # now silent
            await asyncio.wait_for(waiting, 3.0)

    async def refused_then_ready(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        async def worker() -> None:
            await peer.recv()
            await peer.send(encode(WorkerFatal(reason="another control plane is attached", retryable=True)))
            await peer.recv()  # said again
            await peer.send(encode(ready()))

        serving = asyncio.create_task(worker())
        assert isinstance(await client.handshake(10), WorkerReady)
        await serving

    async def woken_often(client: DataplaneClient, peer: zmq.asyncio.Socket) -> None:
        """Entering wait() again (the engine woken with nothing to send) does not restart the clock."""
        client.ping_timeout_s = 1.0
        await peer.send(encode(ready()))
        assert isinstance(await client.receive(10), WorkerReady)
        started = time.monotonic()
        with pytest.raises(DataplaneUnavailable, match="answered no ping"):
            while time.monotonic() - started < 5.0:
                woken = asyncio.Event()
                asyncio.get_running_loop().call_later(0.3, woken.set)
                await client.wait(woken)
        assert time.monotonic() - started < 2.0

    with_peer(body)
    with_peer(refused_then_ready)
    with_peer(woken_often)


def test_a_data_plane_stopped_mid_step_is_lost_in_seconds(tmp_path) -> None:  # noqa: ANN001
    """ZMTP heartbeats: a data plane whose process stops (or whose host is cut off) while a step runs is
    seen when its connection times out (5 s), not when the step timeout (here 60 s) passes."""
    import os
    import signal
    import subprocess
    import sys

    endpoint = f"ipc://{tmp_path}/dp.sock"
    worker = subprocess.Popen([sys.executable, "-m", "dataplane.sim_worker", "--endpoint", endpoint, "--model", "tiny",
                               "--time-scale", "0", "--log-level", "WARNING"])

    async def main() -> None:
        client = DataplaneClient(endpoint)
        client.connect()
        try:
            assert isinstance(await client.handshake(60), WorkerReady)
            os.kill(worker.pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(DataplaneUnavailable, match="connection dropped"):
                await client.run_step(StepPlan(step_id=1), timeout_s=60)
            assert time.monotonic() - started < 15
        finally:
            client.close()

    try:
        asyncio.run(main())
    finally:
        worker.kill()
        worker.wait()
