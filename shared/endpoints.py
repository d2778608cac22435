"""ZeroMQ endpoint rules shared by both planes: what counts as local, and the default safety checks.

The inter-plane socket has no authentication, so by default it is an `ipc://` socket (owner-only file
permissions) or TCP on a loopback address; binding or connecting elsewhere needs an explicit opt-in
(`--allow-remote`). This module holds no socket and no policy beyond these checks.
"""

from __future__ import annotations

import ipaddress
import os

MAX_FRAME_BYTES = 1 << 30  # ZMQ_MAXMSGSIZE on both sockets: a larger frame drops the peer instead


def _tcp_host(endpoint: str) -> str:
    rest = endpoint[len("tcp://"):]
    host, sep, _port = rest.rpartition(":")
    if not sep:
        raise ValueError(f"tcp endpoint needs host:port, got {endpoint!r}")
    if ";" in host:  # "tcp://source;destination": the destination decides
        host = host.rpartition(";")[2]
    return host.strip("[]")


def is_local(endpoint: str) -> bool:
    """ipc://, inproc:// and TCP on a loopback address are local; anything else is not."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = _tcp_host(endpoint)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name or a host name: not provably local
        return False


def check_endpoint(endpoint: str, allow_remote: bool) -> None:
    """Raise ValueError for an endpoint that is not local unless `allow_remote`."""
    if not endpoint.startswith(("ipc://", "inproc://", "tcp://")):
        raise ValueError(f"unsupported ZeroMQ endpoint {endpoint!r}: use ipc:// or tcp://")
    if endpoint.startswith("tcp://"):
        _tcp_host(endpoint)
    if not allow_remote and not is_local(endpoint):
        raise ValueError(
            f"data-plane endpoint {endpoint!r} is not ipc:// or loopback TCP; the socket is unauthenticated, "
            "so pass --allow-remote (dataplane) / --allow-remote-dataplane (serve) to use it on a private network"
        )


def restrict_ipc(endpoint: str) -> None:
    """Make a bound ipc:// socket file owner-only (other local users cannot connect)."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        os.chmod(endpoint[len("ipc://"):], 0o600)
