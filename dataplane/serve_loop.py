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


def serve_plans(endpoint: str, dispatch: Callable[[ToWorker], ToControl | None], running: Callable[[], bool],
                on_tick: Callable[[], None] = lambda: None, name: str = "data plane",
                collect: Callable[[], list[ToControl]] = list, busy: Callable[[], bool] = lambda: False) -> int:
    """Serve until Shutdown (0), a fatal reply to a plan (1), or `running()` turning false (0)."""
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a departed peer raises instead of vanishing
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a control plane's socket reconnecting (same routing id) keeps its place
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # a larger frame drops that peer, not this process
    owner: bytes | None = None
    owner_quiet_since = 0.0  # the later of: the owner's last message, the last moment a step ran
    refused: set[bytes] = set()  # peers told another control plane is attached (logged once each)

    def send_to(peer: bytes, reply: ToControl) -> bool:
        """False when `peer` cannot be reached (its connection closed, or its queue is full)."""
        try:
            sock.send_multipart([peer, encode(reply)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: gone; EAGAIN: not reading, and a blocking send would hang
            return False

    def send(reply: ToControl) -> None:
        if owner is None or not send_to(owner, reply):
            log.warning("no control plane connected; dropped a %s", type(reply).__name__)

    def hello_from(peer: bytes, message: Hello) -> ToControl | None:
        nonlocal owner, owner_quiet_since
        quiet_s = time.monotonic() - owner_quiet_since
        if owner is not None and peer != owner and quiet_s < OWNER_SILENT_S and send_to(owner, Pong()):
            (log.debug if peer in refused else log.warning)("refused a second control plane: one is attached")
            refused.add(peer)
            return WorkerFatal(reason="another control plane is attached to this data plane; it serves one at "
                                      "a time", retryable=True)
        reply = dispatch(message)
        if isinstance(reply, WorkerReady):
            if owner is not None and owner != peer:
                log.info("the attached control plane is gone (its connection closed, or it was silent); a new one "
                         "takes over")
            owner = peer
            refused.discard(peer)
            owner_quiet_since = time.monotonic()
        return reply

    try:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:  # checked before the model loaded, but taken since
            log.error("%s cannot bind %s: %s", name, endpoint, exc)
            return 1
        restrict_ipc(endpoint)
        log.info("%s listening on %s", name, endpoint)
        while running():
            on_tick()
            pending = busy()
            if pending:
                owner_quiet_since = time.monotonic()
            if not sock.poll(0 if pending else 100):
                replies = collect()
                for reply in replies:
                    send(reply)
                if any(isinstance(r, WorkerFatal) for r in replies):
                    return 1
                if pending and not replies:
                    time.sleep(POLL_S)
                continue
            frames = sock.recv_multipart()
            if len(frames) != 2:
                log.error("dropping a message of %d frames (a control plane sends one)", len(frames) - 1)
                continue
            peer, frame = frames
            try:
                message = decode_to_worker(frame)
            except ProtocolError as exc:
                log.error("dropping malformed frame: %s", exc)
                continue
            if isinstance(message, Hello):
                reply = hello_from(peer, message)
                if reply is not None:
                    send_to(peer, reply)
                continue  # a refused Hello: keep serving
            if peer != owner:  # a Ping queued before a takeover is routine; anything else is worth a warning
                (log.debug if isinstance(message, Ping) else log.warning)(
                    "dropping a %s from a control plane that is not attached", type(message).__name__)
                continue
            owner_quiet_since = time.monotonic()
            if isinstance(message, Ping):
                send(Pong(nonce=message.nonce))
                continue
            reply = dispatch(message)
            if reply is not None:
                send(reply)
            if isinstance(message, Shutdown):
                return 0
            if isinstance(reply, WorkerFatal):
                return 1
        return 0
    finally:
        sock.close(linger=0)
        context.term()
        release_ipc(endpoint)
