"""Data-plane endpoints are local (ipc:// or loopback TCP) unless explicitly allowed otherwise."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import DataplaneConfig, ServerConfig
from shared.endpoints import check_endpoint, claim_endpoint, is_local, release_ipc, sweep_stale_ipc

LOCAL = ["ipc:///tmp/x.sock", "ipc://@abstract", "inproc://x", "tcp://127.0.0.1:5555", "tcp://127.1.2.3:1",
         "tcp://localhost:5555", "tcp://[::1]:5555"]
REMOTE = ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.0.0.7:5555", "tcp://eth0:5555", "tcp://dataplane:5555",
          "tcp://[::]:5555", "tcp://127.0.0.1;10.0.0.7:5555"]


@pytest.mark.parametrize("endpoint", LOCAL)
def test_local_endpoints_are_accepted(endpoint: str) -> None:
    assert is_local(endpoint)
    check_endpoint(endpoint, allow_remote=False)


@pytest.mark.parametrize("endpoint", REMOTE)
def test_remote_endpoints_need_the_flag(endpoint: str) -> None:
    assert not is_local(endpoint)
    with pytest.raises(ValueError, match="--allow-remote"):
        check_endpoint(endpoint, allow_remote=False)
    check_endpoint(endpoint, allow_remote=True)


def test_configs_check_their_endpoints() -> None:
    with pytest.raises(ValueError, match="--allow-remote"):
        DataplaneConfig(endpoint="tcp://0.0.0.0:5555")
    with pytest.raises(ValueError, match="--allow-remote"):
        ServerConfig(dataplane_endpoint="tcp://dataplane:5555")
    assert DataplaneConfig(endpoint="tcp://0.0.0.0:5555", allow_remote=True).allow_remote
    assert ServerConfig(dataplane_endpoint="tcp://dataplane:5555", allow_remote_dataplane=True)
    for bad in ("udp://1.2.3.4:5", "tcp://nohostport", "pgm://x"):
        with pytest.raises(ValueError):
            check_endpoint(bad, allow_remote=True)


def test_an_endpoint_is_claimed_once_and_stale_socket_files_are_cleared(tmp_path: Path) -> None:
    path = tmp_path / "dp.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a dead data plane's
    claim = claim_endpoint(f"ipc://{path}")
    assert claim is not None and not path.exists()
    with pytest.raises(ValueError, match="another data plane serves there"):  # libzmq would bind over it
        claim_endpoint(f"ipc://{path}")
    release_ipc(f"ipc://{path}")
    os.close(claim)  # the process exits
    assert not Path(f"{path}.lock").exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:  # a listener that takes no lock
        live.bind(str(path))
        live.listen()
        with pytest.raises(ValueError, match="another process listens there"):
            claim_endpoint(f"ipc://{path}")
    with pytest.raises(ValueError, match="the folder .* does not exist"):
        claim_endpoint(f"ipc://{tmp_path}/nowhere/dp.sock")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(ValueError, match="Address already in use"):
            claim_endpoint(f"tcp://127.0.0.1:{taken.getsockname()[1]}")
    assert claim_endpoint("tcp://127.0.0.1:0") is None
    assert claim_endpoint("tcp://lo:5555") is None and claim_endpoint("tcp://127.0.0.1:*") is None  # libzmq's to say


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_ipc_files_of_killed_servers_are_swept_and_nothing_live_is(tmp_path: Path) -> None:
    """`serve` sweeps its default folder: a SIGKILLed server's `duetserve-<pid>.sock` and `.lock` stay
    behind (nothing ran to remove them). Kept: this process's files, a live pid's, a lock still held,
    a socket someone listens on."""
    def files(pid: int, lock: bool = True) -> Path:
        sock = tmp_path / f"duetserve-{pid}.sock"
        sock.write_text("")
        if lock:
            (tmp_path / f"duetserve-{pid}.sock.lock").write_text("")
        return sock

    dead, dead_lock_only, held, listening = (_dead_pid() for _ in range(4))
    gone = files(dead)
    (tmp_path / f"duetserve-{dead_lock_only}.sock.lock").write_text("")
    ours = files(os.getpid())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = files(live.pid)
        locked = files(held)
        fd = os.open(f"{locked}.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        served = tmp_path / f"duetserve-{listening}.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(served))
            server.listen()
            removed = sweep_stale_ipc(str(tmp_path))
        os.close(fd)
    finally:
        live.kill()
        live.wait()
    assert sorted(removed) == sorted([str(gone), str(tmp_path / f"duetserve-{dead_lock_only}.sock")])
    assert not gone.exists() and not Path(f"{gone}.lock").exists()
    assert not (tmp_path / f"duetserve-{dead_lock_only}.sock.lock").exists()
    assert ours.exists() and alive.exists() and locked.exists() and Path(f"{locked}.lock").exists()
    assert served.exists()
