"""The data-plane process survives whatever arrives on its socket: hypothesis-generated garbage and
mistyped frames are logged and dropped, a wrong-version Hello is refused (WorkerFatal) without the
worker exiting, and it still answers a proper Hello afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codec import decode_to_control, encode
from shared.messages import PROTOCOL_VERSION, Hello, ScheduledSeq, StepPlan, StepResult, WorkerFatal, WorkerReady
from tests.controlplane.test_dataplane_client import FRAMES

ROOT = Path(__file__).resolve().parents[2]


class RawPeer:
    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, frame: bytes, timeout_s: float = 60.0) -> object:
        self.sock.send(frame)
        assert self.sock.poll(timeout_s * 1000), "no answer from the data plane"
        return decode_to_control(self.sock.recv())

    def drain(self) -> list[object]:
        out = []
        while self.sock.poll(0):
            out.append(decode_to_control(self.sock.recv()))
        return out

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[subprocess.Popen[bytes], RawPeer]]:
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='dpw-')}/dp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "dataplane", "--device", "cpu", "--endpoint", endpoint,
                             "--num-kv-blocks", "32", "--log-level", "CRITICAL"], cwd=ROOT)
    peer = RawPeer(endpoint)
    try:
        assert isinstance(peer.ask(encode(Hello(protocol_version=PROTOCOL_VERSION)), 120), WorkerReady)
        assert os.stat(endpoint[len("ipc://"):]).st_mode & 0o777 == 0o600  # owner-only socket file
        yield proc, peer
    finally:
        peer.close()
        proc.terminate()
        proc.wait(30)


def hello_until_ready(peer: RawPeer) -> None:
    """Send a Hello; replies to earlier frames (StepResult, WorkerFatal) may come first."""
    peer.sock.send(encode(Hello(protocol_version=PROTOCOL_VERSION)))
    while True:
        assert peer.sock.poll(60_000), "the data plane stopped answering"
        reply = decode_to_control(peer.sock.recv())
        if isinstance(reply, WorkerReady):
            return
        assert isinstance(reply, (StepResult, WorkerFatal)), reply


def test_wrong_version_hello_is_refused_and_the_worker_lives(worker) -> None:  # noqa: ANN001
    proc, peer = worker
    for version in (0, PROTOCOL_VERSION + 1, -5):
        reply = peer.ask(encode(Hello(protocol_version=version)))
        assert isinstance(reply, WorkerFatal) and "protocol version mismatch" in reply.reason
    assert proc.poll() is None
    hello_until_ready(peer)


def test_plans_for_unknown_sequences_fail_per_sequence(worker) -> None:  # noqa: ANN001
    _, peer = worker
    plan = StepPlan(step_id=1, scheduled=[ScheduledSeq(seq_id=42, num_tokens=3)], finished_seq_ids=[7])
    reply = peer.ask(encode(plan))
    assert isinstance(reply, StepResult) and [f.seq_id for f in reply.failures] == [42]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(FRAMES.filter(lambda f: b"shutdown" not in f), min_size=1, max_size=5))
def test_garbage_frames_never_kill_the_worker(worker, frames: list[bytes]) -> None:  # noqa: ANN001
    proc, peer = worker
    for frame in frames:
        peer.sock.send(frame)
    hello_until_ready(peer)
    assert proc.poll() is None
    peer.drain()


def test_multipart_and_empty_frames(worker) -> None:  # noqa: ANN001
    proc, peer = worker
    peer.sock.send_multipart([b"", msgspec.msgpack.encode({"type": "hello"}), b"\xc1"])
    hello_until_ready(peer)
    assert proc.poll() is None
