"""The control plane's only ZeroMQ code: connect to the data plane, handshake, send plans, get results.

Frames that do not decode are logged and dropped. A dead or silent worker surfaces as
`DataplaneUnavailable`; this module decides nothing about requests.
"""

from __future__ import annotations

import logging
import time

import zmq
import zmq.asyncio

from shared.codec import ProtocolError, decode_to_control, encode
from shared.messages import PROTOCOL_VERSION, Hello, Shutdown, StepPlan, StepResult, ToControl, WorkerFatal, WorkerReady

log = logging.getLogger(__name__)


class DataplaneUnavailable(RuntimeError):
    """The data plane died, refused us, or did not answer in time."""


class DataplaneClient:
    def __init__(self, endpoint: str, context: zmq.asyncio.Context | None = None) -> None:
        self.endpoint = endpoint
        self._own_context = context is None
        self._context = context or zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None

    def connect(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self._socket = sock

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._own_context:
            self._context.term()

    async def handshake(self, timeout_s: float) -> WorkerReady:
        await self._send(Hello(protocol_version=PROTOCOL_VERSION))
        reply = await self.receive(timeout_s)
        if isinstance(reply, WorkerFatal):
            raise DataplaneUnavailable(f"data plane refused the handshake: {reply.reason}")
        if not isinstance(reply, WorkerReady):
            raise DataplaneUnavailable(f"expected WorkerReady, got {type(reply).__name__}")
        return reply

    async def run_step(self, plan: StepPlan, timeout_s: float) -> StepResult:
        await self._send(plan)
        while True:
            reply = await self.receive(timeout_s)
            if isinstance(reply, StepResult) and reply.step_id == plan.step_id:
                return reply
            if isinstance(reply, WorkerFatal):
                raise DataplaneUnavailable(f"data plane failed: {reply.reason}")
            log.warning("dropping unexpected %s while waiting for step %d", type(reply).__name__, plan.step_id)

    async def shutdown(self) -> None:
        if self._socket is not None:
            await self._send(Shutdown(reason="control plane shutting down"))

    async def _send(self, message: Hello | StepPlan | Shutdown) -> None:
        if self._socket is None:
            raise DataplaneUnavailable("not connected")
        await self._socket.send(encode(message), copy=False)

    async def receive(self, timeout_s: float) -> ToControl:
        """The next well-formed message; malformed frames are logged and skipped."""
        if self._socket is None:
            raise DataplaneUnavailable("not connected")
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._socket.poll(remaining * 1000):
                raise DataplaneUnavailable(f"no answer from the data plane within {timeout_s:.1f} s")
            frame = await self._socket.recv()
            try:
                return decode_to_control(frame)
            except ProtocolError as exc:
                log.error("dropping malformed frame from the data plane: %s", exc)


