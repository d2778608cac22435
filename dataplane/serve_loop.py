"""The one receive -> dispatch -> send loop every data-plane process runs (real or simulated).

Plans may be executed asynchronously: `dispatch` launches a plan and returns None, and `collect`
hands back what is ready (progress and results, in plan order) while `busy` says steps are still
running. A plan that arrives while earlier ones run is launched at once (so its host work overlaps
the GPU's). It binds the DEALER socket (frame-size cap, owner-only ipc file), drops malformed
frames, never blocks sending to a departed control plane, keeps serving after refusing a Hello,
and stops on Shutdown or a process-scoped failure. It must not import torch: the simulated worker
uses it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from shared.codec import ProtocolError, decode_to_worker, encode
from shared.endpoints import MAX_FRAME_BYTES, restrict_ipc
from shared.messages import Hello, Shutdown, ToControl, ToWorker, WorkerFatal

log = logging.getLogger(__name__)

POLL_S = 50e-6  # while steps run and no plan waits: how often to look for finished ones


def serve_plans(endpoint: str, dispatch: Callable[[ToWorker], ToControl | None], running: Callable[[], bool],
                on_tick: Callable[[], None] = lambda: None, name: str = "data plane",
                collect: Callable[[], list[ToControl]] = list, busy: Callable[[], bool] = lambda: False) -> int:
    """Serve until Shutdown (0), a fatal reply to a plan (1), or `running()` turning false (0)."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # a larger frame drops that peer, not this process

    def send(reply: ToControl) -> None:
        try:
            sock.send(encode(reply), flags=zmq.NOBLOCK)
        except zmq.Again:  # the control plane left mid-step: a blocking send would hang here
            log.warning("no control plane connected; dropped a %s", type(reply).__name__)

    try:
        sock.bind(endpoint)
        restrict_ipc(endpoint)
        log.info("%s listening on %s", name, endpoint)
        while running():
            on_tick()
            pending = busy()
            if not sock.poll(0 if pending else 100):
                replies = collect()
                for reply in replies:
                    send(reply)
                if any(isinstance(r, WorkerFatal) for r in replies):
                    return 1
                if pending and not replies:
                    time.sleep(POLL_S)
                continue
            try:
                message = decode_to_worker(sock.recv())
            except ProtocolError as exc:
                log.error("dropping malformed frame: %s", exc)
                continue
            reply = dispatch(message)
            if reply is not None:
                send(reply)
            if isinstance(message, Shutdown):
                return 0
            if isinstance(reply, WorkerFatal) and not isinstance(message, Hello):  # a refused Hello: keep serving
                return 1
        return 0
    finally:
        sock.close(linger=0)
        context.term()
