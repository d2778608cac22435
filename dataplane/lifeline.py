"""A spawned data-plane process must not outlive the control plane that started it (no torch here)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM us when the parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent_pid:
        sys.exit(1)
