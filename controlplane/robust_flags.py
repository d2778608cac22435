"""Command-line flags for backpressure, shutdown, supervision and security of `duetserve serve`, and
the matching client flags of `duetserve generate` / `health`.

Kept apart from `cli` so the flag groups stay small; this module only parses, it serves nothing.
"""

from __future__ import annotations

import argparse
import os

from controlplane.security import AUTH_TOKEN_ENV
from shared.config import ServerConfig, TlsConfig

_D = ServerConfig()


def add_robustness_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits and shutdown")
    g.add_argument("--max-queued-requests", type=int, default=_D.max_queued_requests,
                   help="requests that may wait for their first step; beyond it new calls get "
                        f"RESOURCE_EXHAUSTED (default {_D.max_queued_requests})")
    g.add_argument("--max-queued-tokens", type=int, default=_D.max_queued_tokens,
                   help="tokens the waiting requests may hold in all; beyond it new calls get "
                        f"RESOURCE_EXHAUSTED (default {_D.max_queued_tokens})")
    g.add_argument("--shutdown-grace", type=float, default=_D.shutdown_grace_s,
                   help="on SIGTERM: seconds running requests may finish before they end UNAVAILABLE "
                        f"(default {_D.shutdown_grace_s:g})")
    g.add_argument("--restart-backoff", type=float, default=_D.restart_backoff_s,
                   help="first pause before restarting a crashed data plane; doubles up to 10 s")
    s = p.add_argument_group("security")
    s.add_argument("--allow-remote-dataplane", action="store_true",
                   help="allow a tcp:// data-plane endpoint that is not loopback (the ZeroMQ socket has no "
                        "authentication: use it only on a private network)")
    s.add_argument("--tls-cert", default=None, help="PEM certificate (chain): serve gRPC over TLS")
    s.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates it signed (mTLS)")
    s.add_argument("--auth-token", default=os.environ.get(AUTH_TOKEN_ENV) or None,  # an empty variable: unset
                   help=f"require 'authorization: Bearer TOKEN' on every RPC but health (default: ${AUTH_TOKEN_ENV}; "
                        "the variable keeps it out of the process list)")


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return TlsConfig(cert_file=args.tls_cert, key_file=args.tls_key, client_ca_file=args.tls_client_ca)


def robustness_from_args(args: argparse.Namespace) -> dict[str, object]:
    """ServerConfig keyword arguments from the flags above."""
    return {
        "allow_remote_dataplane": args.allow_remote_dataplane,
        "tls": _tls(args),
        "auth_token": args.auth_token,  # None: no token; "" or blanks are refused (they would turn auth off)
        "max_queued_requests": args.max_queued_requests,
        "max_queued_tokens": args.max_queued_tokens,
        "shutdown_grace_s": args.shutdown_grace,
        "restart_backoff_s": args.restart_backoff,
    }


def add_client_security_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server with the system CAs")
    g.add_argument("--tls-ca", default=None, help="PEM CA to verify the server with (implies --tls)")
    g.add_argument("--tls-cert", default=None, help="PEM client certificate (mTLS)")
    g.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    g.add_argument("--tls-server-name", default=None, help="expected server name, if not the address's host")
    g.add_argument("--auth-token", default=os.environ.get(AUTH_TOKEN_ENV),
                   help=f"bearer token sent with every call (default: ${AUTH_TOKEN_ENV})")
