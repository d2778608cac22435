"""ZeroMQ endpoint rules shared by both planes: what counts as local, and the default safety checks.

The inter-plane socket has no authentication, so by default it is an `ipc://` socket (owner-only file
permissions) or TCP on a loopback address; binding or connecting elsewhere needs an explicit opt-in
(`--allow-remote`). This module holds no socket and no policy beyond these checks.
"""

from __future__ import annotations

import ipaddress
import os
import socket

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


def _ipc_path(endpoint: str) -> str | None:
    """The socket file of an ipc:// endpoint (None: not ipc, or an abstract one, which has no file)."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return endpoint[len("ipc://"):]
    return None


def check_bindable(endpoint: str) -> None:
    """Before a data plane loads its model: raise ValueError, naming why, for an endpoint it could not
    bind. An ipc:// file a live process listens on is refused (libzmq would silently take the path over);
    one a dead process left is removed. A tcp:// port in use is refused."""
    path = _ipc_path(endpoint)
    if path is not None:
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise ValueError(f"cannot bind {endpoint}: the folder {folder} does not exist")
        if not os.path.exists(path):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):  # nobody listens: a dead process's file
                os.unlink(path)
                return
            except OSError as exc:
                raise ValueError(f"cannot bind {endpoint}: {exc.strerror or exc}") from None
        raise ValueError(f"cannot bind {endpoint}: another process (a data plane?) listens there")
    if endpoint.startswith("tcp://"):
        host, port = _tcp_host(endpoint), int(endpoint.rpartition(":")[2])
        host = "0.0.0.0" if host == "*" else host
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds
                probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot bind {endpoint}: {exc.strerror or exc}") from None


def release_ipc(endpoint: str) -> None:
    """After a bound ipc:// socket closed: remove its file (libzmq leaves it behind)."""
    path = _ipc_path(endpoint)
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
