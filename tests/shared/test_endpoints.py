"""Data-plane endpoints are local (ipc:// or loopback TCP) unless explicitly allowed otherwise."""

from __future__ import annotations

import pytest

from shared.config import DataplaneConfig, ServerConfig
from shared.endpoints import check_endpoint, is_local

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
