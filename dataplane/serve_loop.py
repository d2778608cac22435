"""The one receive -> dispatch -> send loop every data-plane process runs (real or simulated).

It binds the DEALER socket (frame-size cap, owner-only ipc file), drops malformed frames, never blocks
sending to a departed control plane, keeps serving after refusing a Hello, and stops on Shutdown or
a process-scoped failure. It must not import torch: the simulated worker uses it too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from shared.codec import ProtocolError, decode_to_worker, encode
from shared.endpoints import MAX_FRAME_BYTES, restrict_ipc
from shared.messages import Hello, Shutdown, ToControl, ToWorker, WorkerFatal

log = logging.getLogger(__name__)


def serve_plans(endpoint: str, dispatch: Callable[[ToWorker], ToControl | None], running: Callable[[], bool],
                on_tick: Callable[[], None] = lambda: None, name: str = "data plane") -> int:
    """Serve until Shutdown (0), a fatal reply to a plan (1), or `running()` turning false (0)."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # a larger frame drops that peer, not this process
    try:
        sock.bind(endpoint)
        restrict_ipc(endpoint)
        log.info("%s listening on %s", name, endpoint)
        while running():
            on_tick()
            if not sock.poll(100):
                continue
            try:
                message = decode_to_worker(sock.recv())
            except ProtocolError as exc:
                log.error("dropping malformed frame: %s", exc)
                continue
            reply = dispatch(message)
            if reply is not None:
                try:
                    sock.send(encode(reply), flags=zmq.NOBLOCK)
                except zmq.Again:  # the control plane left mid-step: a blocking send would hang here
                    log.warning("no control plane connected; dropped a %s", type(reply).__name__)
            if isinstance(message, Shutdown):
                return 0
            if isinstance(reply, WorkerFatal) and not isinstance(message, Hello):  # a refused Hello: keep serving
                return 1
        return 0
    finally:
        sock.close(linger=0)
        context.term()
