"""ZeroMQ endpoint rules shared by both planes: what counts as local, and the default safety checks.

The inter-plane socket has no authentication, so by default it is an `ipc://` socket (owner-only file
permissions) or TCP on a loopback address; binding or connecting elsewhere needs an explicit opt-in
(`--allow-remote`). This module holds no socket and no policy beyond these checks.
"""

from __future__ import annotations

import fcntl
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
    path = _ipc_path(endpoint)
    if path is not None:
        os.chmod(path, 0o600)


def _ipc_path(endpoint: str) -> str | None:
    """The socket file of an ipc:// endpoint (None: not ipc, or an abstract one, which has no file)."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return endpoint[len("ipc://"):]
    return None


def claim_endpoint(endpoint: str) -> int | None:
    """Before a data plane loads its model: raise ValueError, naming why, for an endpoint it could not
    serve on. An ipc:// path is claimed for the life of the process by a lock on `<path>.lock` (the
    returned descriptor: keep it open): libzmq binds over a socket file another process serves on, so
    without it two data planes could share a path, the first left unreachable. A socket file there with
    no live claim is a dead process's and is removed. A tcp:// port in use is refused (hosts given as
    interface names and wildcard ports are left to libzmq)."""
    path = _ipc_path(endpoint)
    if path is not None:
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise ValueError(f"cannot bind {endpoint}: the folder {folder} does not exist")
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise ValueError(f"cannot bind {endpoint}: another data plane serves there") from None
        if _listened_on(path):  # a process that takes no lock
            os.close(lock)
            raise ValueError(f"cannot bind {endpoint}: another process listens there")
        release_ipc(endpoint, lock_too=False)  # a dead process's file, if any
        return lock
    if endpoint.startswith("tcp://"):
        host, port = _tcp_host(endpoint), endpoint.rpartition(":")[2]
        host = "0.0.0.0" if host == "*" else host
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            port_number = int(port)
        except (OSError, ValueError):  # an interface or host name, a wildcard port: libzmq decides
            return None
        why = tcp_bind_error(host, port_number)
        if why is not None:
            raise ValueError(f"cannot bind {endpoint}: {why}")
    return None


def tcp_bind_error(host: str, port: int) -> str | None:
    """What the OS says to listening on host:port (e.g. "Address already in use"); None: it could."""
    try:
        with socket.create_server((host, port)):  # SO_REUSEADDR on POSIX, as libzmq and gRPC bind
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def release_ipc(endpoint: str, lock_too: bool = True) -> None:
    """After a bound ipc:// socket closed: remove its file, which libzmq leaves behind (and the claim's
    lock file: only the process holding the claim calls this)."""
    path = _ipc_path(endpoint)
    if path is not None:
        for leftover in (path, path + ".lock") if lock_too else (path,):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass


def sweep_stale_ipc(folder: str, prefix: str = "duetserve-") -> list[str]:
    """Remove the ipc socket and lock files of `serve` processes that died without cleaning up (SIGKILL)
    from `folder`: `<prefix><pid>.sock` and its `.lock`, when that pid is gone, no process holds the
    lock and nobody listens on the socket. Returns the socket paths removed. Never touches this
    process's files nor those of a pid that is alive (another user's included)."""
    pids = {name[len(prefix):].split(".", 1)[0] for name in os.listdir(folder)
            if name.startswith(prefix) and name.endswith((".sock", ".sock.lock"))}
    removed = []
    for text in sorted(pids):
        if not text.isdigit() or int(text) == os.getpid() or _alive(int(text)):
            continue
        path = os.path.join(folder, f"{prefix}{text}.sock")
        try:
            lock: int | None = os.open(path + ".lock", os.O_RDWR)
        except OSError:  # no lock file (or not ours to open)
            lock = None
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live claim, leave it
            if _listened_on(path):
                continue
            release_ipc(f"ipc://{path}")
            removed.append(path)
        except OSError:  # the lock is held, or a file is not ours to remove
            continue
        finally:
            if lock is not None:
                os.close(lock)
    return removed


def _listened_on(path: str) -> bool:
    """Whether a process listens on the unix socket at `path` (False: no file, or a dead process's)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
