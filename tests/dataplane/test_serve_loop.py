"""The data plane's receive loop (`serve_plans`) on its own, in a thread, with a trivial dispatcher: one
control plane at a time (a second Hello is refused, retryably, while the first's connection is open, and
takes over once it closes), messages from a peer that is not attached are dropped, Pings are answered."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from dataplane.serve_loop import serve_plans
from shared.codec import decode_to_control, encode
from shared.messages import PROTOCOL_VERSION, Hello, Ping, Pong, StepPlan, StepResult, ToControl, ToWorker
from shared.messages import WorkerFatal, WorkerReady
from tests.controlplane.test_dataplane_client import ready

HELLO = encode(Hello(protocol_version=PROTOCOL_VERSION))


@contextlib.contextmanager
def patch_refusals() -> Iterator[list[str]]:
    """The data plane's "refused a second control plane" log lines while the block runs."""
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "refused a second control plane" in record.getMessage():
                seen.append(record.getMessage())

    handler, logger = Catch(), logging.getLogger("dataplane.serve_loop")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class Peer:
    """A control plane's socket as DataplaneClient makes it (a DEALER)."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def next(self, timeout_s: float = 10.0, skip_probes: bool = True) -> ToControl:
        """The next message, the owner's unasked Pongs (nonce 0) skipped."""
        while True:
            assert self.sock.poll(timeout_s * 1000), "no answer from the loop"
            message = decode_to_control(self.sock.recv())
            if not (skip_probes and isinstance(message, Pong) and message.nonce == 0):
                return message

    def ask(self, frame: bytes) -> ToControl:
        self.sock.send(frame)
        return self.next()

    def silent(self, wait_s: float = 0.3) -> bool:
        """Nothing but the owner probes (unasked Pongs) comes within `wait_s`."""
        while self.sock.poll(wait_s * 1000):
            message = decode_to_control(self.sock.recv())
            if not (isinstance(message, Pong) and message.nonce == 0):
                return False
        return True


@pytest.fixture
def loop() -> Iterator[tuple[zmq.Context, str, list[ToWorker]]]:
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='dsl-')}/s"
    seen: list[ToWorker] = []
    running = threading.Event()
    running.set()

    def dispatch(message: ToWorker) -> ToControl | None:
        seen.append(message)
        if isinstance(message, Hello):
            return ready()
        if isinstance(message, StepPlan):
            return StepResult(step_id=message.step_id)
        return None

    thread = threading.Thread(target=serve_plans, args=(endpoint, dispatch, running.is_set), daemon=True)
    thread.start()
    context = zmq.Context()
    try:
        yield context, endpoint, seen
    finally:
        running.clear()
        thread.join(10)
        context.destroy(linger=0)
    assert not thread.is_alive()


def test_one_control_plane_at_a_time(loop) -> None:  # noqa: ANN001
    context, endpoint, seen = loop
    first, second = Peer(context, endpoint), Peer(context, endpoint)
    assert isinstance(first.ask(HELLO), WorkerReady)
    refused = second.ask(HELLO)
    assert isinstance(refused, WorkerFatal) and refused.retryable and "another control plane" in refused.reason
    second.sock.send(encode(StepPlan(step_id=9)))  # not attached: dropped, not run
    assert second.silent()
    assert isinstance(first.ask(encode(StepPlan(step_id=3))), StepResult)
    assert [type(m).__name__ for m in seen] == ["Hello", "StepPlan"]  # only the owner's reached the worker
    pong = first.ask(encode(Ping(nonce=7)))
    assert isinstance(pong, Pong) and pong.nonce == 7
    first.sock.close(linger=0)  # the owner leaves: the next Hello takes over
    for _ in range(50):
        reply = second.ask(HELLO)
        if isinstance(reply, WorkerReady):
            break
        assert isinstance(reply, WorkerFatal) and reply.retryable  # its close not yet seen
    assert isinstance(reply, WorkerReady)
    assert isinstance(second.ask(encode(StepPlan(step_id=4))), StepResult)


def test_a_silent_owner_with_an_open_connection_is_taken_over(loop, monkeypatch) -> None:  # noqa: ANN001
    """A hung control plane (its process alive, its connection open) would lock the data plane forever: an
    owner heard nothing from for OWNER_SILENT_S with no step running is taken over."""
    import dataplane.serve_loop as serve_loop

    monkeypatch.setattr(serve_loop, "OWNER_SILENT_S", 1.0)
    context, endpoint, _ = loop
    owner, other = Peer(context, endpoint), Peer(context, endpoint)
    assert isinstance(owner.ask(HELLO), WorkerReady)
    refused = other.ask(HELLO)
    assert isinstance(refused, WorkerFatal) and refused.retryable
    time.sleep(1.2)  # the owner says nothing: hung
    assert isinstance(other.ask(HELLO), WorkerReady)
    owner.sock.send(encode(StepPlan(step_id=1)))  # the old owner's plans are dropped now
    assert owner.silent()


def test_a_client_reconnecting_is_the_same_peer() -> None:
    """DataplaneClient keeps one routing id across reset(): its new socket takes the old one's place at
    once (ROUTER_HANDOVER), never refused as "another control plane" while the old pipe closes."""
    import asyncio

    from controlplane.dataplane_client import DataplaneClient

    endpoint = f"ipc://{tempfile.mkdtemp(prefix='dsl-')}/s"
    running = threading.Event()
    running.set()
    thread = threading.Thread(target=serve_plans, args=(endpoint, lambda m: ready() if isinstance(m, Hello) else None,
                                                        running.is_set), daemon=True)
    thread.start()

    async def main() -> None:
        client = DataplaneClient(endpoint)
        client.connect()
        try:
            ids = set()
            for _ in range(20):
                assert isinstance(await client.handshake(10), WorkerReady)
                assert client._socket is not None
                ids.add(client._socket.getsockopt(zmq.ROUTING_ID))
                client.reset()
            assert len(ids) == 1
        finally:
            client.close()

    try:
        with patch_refusals() as refusals:
            asyncio.run(main())
        assert refusals == []
    finally:
        running.clear()
        thread.join(10)


def test_a_refused_client_backs_off(loop) -> None:  # noqa: ANN001
    """A control plane refused while another is attached says Hello again after 1 s, doubling (up to 10 s),
    not every second for as long as it waits."""
    import asyncio

    from controlplane.dataplane_client import DataplaneClient, DataplaneUnavailable

    context, endpoint, _ = loop
    owner = Peer(context, endpoint)
    assert isinstance(owner.ask(HELLO), WorkerReady)

    async def main() -> None:
        client = DataplaneClient(endpoint)
        client.connect()
        try:
            with pytest.raises(DataplaneUnavailable):
                await client.handshake(8.0)
        finally:
            client.close()

    with patch_refusals() as refusals:
        asyncio.run(main())
    assert 3 <= len(refusals) <= 4  # at 0, 1, 3 and 7 s; every second would be 8
