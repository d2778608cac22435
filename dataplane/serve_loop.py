"""The one receive -> dispatch -> send loop every data-plane process runs (real or simulated).

Plans may be executed asynchronously: `dispatch` launches a plan and returns None, and `collect`
hands back what is ready (progress and results, in plan order) while `busy` says steps are still
running. A plan that arrives while earlier ones run is launched at once (so its host work overlaps
the GPU's). It binds a ROUTER socket (frame-size cap, owner-only ipc file), drops malformed
frames, never blocks sending to a departed control plane, keeps serving after refusing a Hello,
and stops on Shutdown or a process-scoped failure. It must not import torch: the simulated worker
uses it too.

One control plane at a time: the peer whose Hello was accepted owns the data plane, and only its
messages are served and only it gets replies. Another peer's Hello is refused (retryable) while the
owner is there: its connection open, which an unasked Pong to it tells (ROUTER_MANDATORY: a send to a
peer whose connection closed fails at once; ZMTP heartbeats close the connection of a peer whose
process stopped or whose host is gone), and heard from lately (an idle owner Pings every second; a
silent one with no step running is hung). Otherwise the new peer takes over. Pings are answered here,
between steps, so a control plane can tell an idle data plane from a hung one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from shared.codec import ProtocolError, decode_to_worker, encode
from shared.endpoints import MAX_FRAME_BYTES, release_ipc, restrict_ipc
from shared.messages import Hello, Ping, Pong, Shutdown, ToControl, ToWorker, WorkerFatal, WorkerReady

log = logging.getLogger(__name__)

POLL_S = 50e-6  # while steps run and no plan waits: how often to look for finished ones
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 1000, 5000  # ZMTP: a peer that answers none for 5 s is disconnected
OWNER_SILENT_S = 30.0  # with no step running, an owner not heard from for this long (it Pings every second) is hung


class _PlanSocket:
    """The data plane's ROUTER socket and its owner: sends that never block, the Hello rule (one control
    plane at a time), and one received frame's handling."""

    def __init__(self, endpoint: str, dispatch: Callable[[ToWorker], ToControl | None]) -> None:
        self.endpoint, self.dispatch = endpoint, dispatch
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a departed peer raises instead of vanishing
        # a control plane's socket reconnecting (same routing id) keeps its place
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # a larger frame drops that peer, not this process
        self.owner: bytes | None = None
        self.owner_quiet_since = 0.0  # the later of: the owner's last message, the last moment a step ran
        self.refused: set[bytes] = set()  # peers told another control plane is attached (logged once each)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()
        release_ipc(self.endpoint)

    def send_to(self, peer: bytes, reply: ToControl) -> bool:
        """False when `peer` cannot be reached (its connection closed, or its queue is full)."""
        try:
            self.sock.send_multipart([peer, encode(reply)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: gone; EAGAIN: not reading, and a blocking send would hang
            return False

    def send(self, reply: ToControl) -> None:
        if self.owner is None or not self.send_to(self.owner, reply):
            log.warning("no control plane connected; dropped a %s", type(reply).__name__)

    def hello_from(self, peer: bytes, message: Hello) -> ToControl | None:
        quiet_s = time.monotonic() - self.owner_quiet_since
        if (self.owner is not None and peer != self.owner and quiet_s < OWNER_SILENT_S
                and self.send_to(self.owner, Pong())):
            (log.debug if peer in self.refused else log.warning)("refused a second control plane: one is attached")
            self.refused.add(peer)
            return WorkerFatal(reason="another control plane is attached to this data plane; it serves one at "
                                      "a time", retryable=True)
        reply = self.dispatch(message)
        if isinstance(reply, WorkerReady):
            if self.owner is not None and self.owner != peer:
                log.info("the attached control plane is gone (its connection closed, or it was silent); a new one "
                         "takes over")
            self.owner = peer
            self.refused.discard(peer)
            self.owner_quiet_since = time.monotonic()
        return reply

    def receive(self) -> int | None:
        """Handle one waiting frame; the exit code when serving ends with it (Shutdown 0, a fatal reply 1)."""
        frames = self.sock.recv_multipart()
        if len(frames) != 2:
            log.error("dropping a message of %d frames (a control plane sends one)", len(frames) - 1)
            return None
        peer, frame = frames
        try:
            message = decode_to_worker(frame)
        except ProtocolError as exc:
            log.error("dropping malformed frame: %s", exc)
            return None
        if isinstance(message, Hello):
            reply = self.hello_from(peer, message)
            if reply is not None:
                self.send_to(peer, reply)
            return None  # a refused Hello: keep serving
        if peer != self.owner:  # a Ping queued before a takeover is routine; anything else is worth a warning
            (log.debug if isinstance(message, Ping) else log.warning)(
                "dropping a %s from a control plane that is not attached", type(message).__name__)
            return None
        self.owner_quiet_since = time.monotonic()
        if isinstance(message, Ping):
            self.send(Pong(nonce=message.nonce))
            return None
        reply = self.dispatch(message)
        if reply is not None:
            self.send(reply)
        if isinstance(message, Shutdown):
            return 0
        return 1 if isinstance(reply, WorkerFatal) else None


def serve_plans(endpoint: str, dispatch: Callable[[ToWorker], ToControl | None], running: Callable[[], bool],
                on_tick: Callable[[], None] = lambda: None, name: str = "data plane",
                collect: Callable[[], list[ToControl]] = list, busy: Callable[[], bool] = lambda: False) -> int:
    """Serve until Shutdown (0), a fatal reply to a plan (1), or `running()` turning false (0)."""
    plans = _PlanSocket(endpoint, dispatch)
    try:
        try:
            plans.sock.bind(endpoint)
        except zmq.ZMQError as exc:  # checked before the model loaded, but taken since
            log.error("%s cannot bind %s: %s", name, endpoint, exc)
            return 1
        restrict_ipc(endpoint)
        log.info("%s listening on %s", name, endpoint)
        while running():
            on_tick()
            pending = busy()
            if pending:
                plans.owner_quiet_since = time.monotonic()
            if plans.sock.poll(0 if pending else 100):
                code = plans.receive()
                if code is not None:
                    return code
                continue
            replies = collect()
            for reply in replies:
                plans.send(reply)
            if any(isinstance(r, WorkerFatal) for r in replies):
                return 1
            if pending and not replies:
                time.sleep(POLL_S)
        return 0
    finally:
        plans.close()
