"""The control plane's only ZeroMQ code: connect to the data plane, handshake, send plans, get results.

Frames that do not decode are logged and dropped. A dead, refusing or silent worker surfaces as
`DataplaneUnavailable`, promptly: a socket monitor reports the connection dropping (a killed worker)
while a step runs and while the engine is idle, and every wait is bounded. Sends never block (a full
queue is an error). `reset()` replaces the socket, so nothing queued for a lost worker reaches the
next one. This module decides nothing about requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shared.codec import ProtocolError, decode_to_control, encode
from shared.endpoints import MAX_FRAME_BYTES
from shared.messages import (
    PROTOCOL_VERSION, Hello, Ping, Pong, Shutdown, StepPlan, StepProgress, StepResult, ToControl, TokenMasks,
    WorkerFatal, WorkerReady, fold_progress,
)

log = logging.getLogger(__name__)

POLL_SLICE_S = 0.2  # how often a wait checks for a peer declared lost from outside (the supervisor)
PING_INTERVAL_S = 1.0  # while idle, Ping this often
PING_TIMEOUT_S = 10.0  # while idle, a data plane that answered no Ping for this long is hung
REFUSED_RETRY_MAX_S = 10.0  # a Hello refused for now (another control plane attached) is said again after
# 1 s, doubling to this: a control plane left waiting does not knock every second for ever
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 1000, 5000  # ZMTP: a data plane stopped or cut off mid-step is
# seen in 5 s (its connection dropped), not after the step timeout
HELLO_RESEND_S = 1.0  # while connected and unanswered (or refused for now), Hello again; Hello is idempotent
SEND_HWM = 64  # messages queued for the worker; we never have more than a few in flight


class DataplaneUnavailable(RuntimeError):
    """The data plane died, refused us, or did not answer in time."""


class DataplaneTimeout(DataplaneUnavailable):
    """No answer in time: the worker is hung (or still loading, during a handshake)."""


class DataplaneClient:
    def __init__(self, endpoint: str, context: zmq.asyncio.Context | None = None,
                 ping_timeout_s: float = PING_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self._own_context = context is None
        self._context = context or zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._lost: str | None = None
        self.ping_timeout_s = ping_timeout_s
        # one routing id for every socket of this client: a reconnect is the same peer to the data plane's
        # ROUTER (ROUTER_HANDOVER), not a second control plane refused while the old pipe closes
        self._routing_id = os.urandom(8)
        self._refusals = 0  # Hellos refused for now in a row (reset by a WorkerReady)
        self._pinged = 0.0  # when the last Ping went out while idle
        self._heard = 0.0  # when the data plane was last heard from

    # ------------------------------------------------------------------ connection

    def connect(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self._routing_id)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        sock.connect(self.endpoint)
        self._socket = sock
        self._lost = None
        self._connected = False

    def disconnect(self) -> None:
        """Close the socket (the data plane sees its owner leave); `reset()` connects again."""
        self._close_sockets(linger_ms=0)

    def reset(self) -> None:
        """A fresh socket: frames queued for (or from) the previous worker are discarded."""
        self._close_sockets(linger_ms=0)
        self.connect()

    def close(self, linger_ms: int = 0) -> None:
        self._close_sockets(linger_ms)
        if self._own_context:
            self._context.term()

    def _close_sockets(self, linger_ms: int) -> None:
        if self._socket is not None:
            try:
                self._socket.disable_monitor()
            except zmq.ZMQError:
                pass
            self._socket.close(linger=linger_ms)
            self._socket = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def mark_lost(self, reason: str) -> None:
        """Declare the peer gone (e.g. its process exited): the current or next wait raises."""
        self._lost = self._lost or reason

    def _check_lost(self) -> None:
        if self._socket is None:
            raise DataplaneUnavailable("not connected")
        if self._lost is not None:
            raise DataplaneUnavailable(self._lost)

    async def _drain_monitor(self) -> None:
        assert self._monitor is not None
        while await self._monitor.poll(0):
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_CONNECTED:
                self._connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.mark_lost(f"the data plane's connection dropped ({event['endpoint']!r})")
        self._check_lost()

    # ------------------------------------------------------------------ messages

    async def handshake(self, timeout_s: float) -> WorkerReady:
        hello = Hello(protocol_version=PROTOCOL_VERSION)
        await self._send(hello)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = await self.receive(max(min(remaining, HELLO_RESEND_S), 0.0))
            except DataplaneTimeout:
                if remaining <= HELLO_RESEND_S:
                    raise DataplaneTimeout(f"no answer to Hello within {timeout_s:.1f} s") from None
                if self._connected:  # not queued behind a connection still to come: say it again
                    await self._send(hello)
                continue
            if isinstance(reply, WorkerFatal) and reply.retryable and remaining > HELLO_RESEND_S:
                pause = min(HELLO_RESEND_S * 2 ** self._refusals, REFUSED_RETRY_MAX_S)
                (log.warning if self._refusals == 0 else log.debug)(
                    "the data plane refused the handshake for now (%s); saying Hello again every %.0f s or less",
                    reply.reason, REFUSED_RETRY_MAX_S)
                self._refusals += 1
                await asyncio.sleep(min(pause, remaining - HELLO_RESEND_S))
                await self._send(hello)
                continue
            if isinstance(reply, WorkerFatal):
                raise DataplaneUnavailable(f"data plane refused the handshake: {reply.reason}")
            if isinstance(reply, WorkerReady):
                self._refusals = 0
                break
            log.warning("dropping a stale %s while waiting for WorkerReady", type(reply).__name__)
        if reply.protocol_version != PROTOCOL_VERSION:
            raise DataplaneUnavailable(
                f"protocol version mismatch: data plane speaks {reply.protocol_version}, "
                f"control plane speaks {PROTOCOL_VERSION}"
            )
        return reply

    async def run_step(self, plan: StepPlan, timeout_s: float) -> StepResult:
        await self.send_plan(plan)
        return await self.receive_result(plan.step_id, timeout_s)

    async def send_plan(self, plan: StepPlan) -> None:
        """Queue a plan for the worker (it may still be running earlier ones)."""
        await self._send(plan)

    async def send_masks(self, masks: TokenMasks) -> None:
        """Send a step's token masks (it was planned with `masks_follow`; its sampling waits for them)."""
        await self._send(masks)

    async def receive_result(self, step_id: int, timeout_s: float,
                             on_progress: Callable[[StepProgress], None] | None = None) -> StepResult:
        """The result of step `step_id` (results come back in the order plans were sent); its
        StepProgress messages on the way go to `on_progress` or, without one, are folded into the
        result returned (each sequence's early tokens first), so no token is lost."""
        early: list[StepProgress] = []
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = await self.receive(max(remaining, 0.0))
            except DataplaneTimeout as exc:
                raise DataplaneTimeout(f"step {step_id} took longer than {timeout_s:.1f} s") from exc
            if isinstance(reply, StepResult) and reply.step_id == step_id:
                return fold_progress(early, reply) if early else reply
            if isinstance(reply, StepProgress) and reply.step_id == step_id:
                if on_progress is not None:
                    on_progress(reply)
                else:
                    early.append(reply)
                continue
            if isinstance(reply, WorkerFatal):
                raise DataplaneUnavailable(f"data plane failed: {reply.reason}")
            log.warning("dropping unexpected %s while waiting for step %d", type(reply).__name__, step_id)

    async def shutdown(self) -> None:
        if self._socket is not None:
            await self._send(Shutdown(reason="control plane shutting down"))

    async def _send(self, message: Hello | StepPlan | TokenMasks | Shutdown | Ping) -> None:
        self._check_lost()
        assert self._socket is not None
        try:
            await self._socket.send(encode(message), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again as exc:
            raise DataplaneUnavailable("the data plane is not taking messages (send queue full)") from exc

    async def receive(self, timeout_s: float) -> ToControl:
        """The next well-formed message; malformed frames are logged and skipped, and so are Pongs
        (they only say the data plane is there)."""
        self._check_lost()
        assert self._socket is not None and self._monitor is not None
        poller = zmq.asyncio.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DataplaneTimeout(f"no answer from the data plane within {timeout_s:.1f} s")
            ready = dict(await poller.poll(min(remaining, POLL_SLICE_S) * 1000))
            if ready.get(self._socket):
                message = self._decode(await self._socket.recv())
                if message is not None and not isinstance(message, Pong):
                    return message
                continue
            await self._drain_monitor()

    def _decode(self, frame: bytes) -> ToControl | None:
        """A frame from the data plane (which was heard from), or None: malformed, logged and dropped."""
        try:
            message = decode_to_control(frame)
        except ProtocolError as exc:
            log.error("dropping malformed frame from the data plane: %s", exc)
            return None
        self._heard = time.monotonic()
        return message

    async def wait(self, event: asyncio.Event) -> None:
        """Wait for `event` (new work) while watching the connection; raises if the peer is lost, or
        hung: no step runs meanwhile, so a data plane not heard from (no Pong, no result, no handshake
        answer) for `ping_timeout_s` is."""
        self._check_lost()
        assert self._monitor is not None and self._socket is not None
        waiter = asyncio.ensure_future(event.wait())
        try:
            while not waiter.done():
                await self._ping_if_due()
                poll = asyncio.ensure_future(self._monitor.poll(POLL_SLICE_S * 1000))
                done, _ = await asyncio.wait({waiter, poll}, return_when=asyncio.FIRST_COMPLETED)
                if poll not in done:
                    poll.cancel()
                await self._drain_monitor()
                await self._drain_pongs()
        finally:
            waiter.cancel()

    async def _ping_if_due(self) -> None:
        now = time.monotonic()
        if now - self._heard > self.ping_timeout_s:
            self.mark_lost(f"the data plane answered no ping for {self.ping_timeout_s:g} s: hung")
            self._check_lost()
        if now - self._pinged >= PING_INTERVAL_S:
            self._pinged = now
            await self._send(Ping())

    async def _drain_pongs(self) -> None:
        """Read what came while idle: Pongs (and anything else, which nothing waits for: logged, dropped)."""
        assert self._socket is not None
        while await self._socket.poll(0):
            message = self._decode(await self._socket.recv())
            if isinstance(message, WorkerFatal):
                self.mark_lost(f"data plane failed: {message.reason}")
                self._check_lost()
            elif message is not None and not isinstance(message, Pong):
                log.warning("dropping an unexpected %s while idle", type(message).__name__)
