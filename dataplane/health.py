"""A liveness heartbeat for the data plane: the serve loop touches a file, a checker reads its age.

The data plane's only socket serves one control plane at a time (a second peer's Hello is refused), so
health is not probed over ZeroMQ. The file exists only once the model is loaded and the socket bound,
and stays fresh while the loop turns: a process starting removes one a previous process left (a
container restarted with the same /tmp), so a loading data plane never reads as alive. This module must
not import torch and decides nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class Heartbeat:
    """Touches `path` at most every `interval_s`; removes it on close. A None path does nothing."""

    def __init__(self, path: str | None, interval_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self.interval_s = interval_s
        self._last = 0.0

    def beat(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{os.getpid()} {time.time():.3f}\n")

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def clear_stale(path: str | None) -> None:
    """At process start: a heartbeat file there is a previous process's."""
    if path:
        Path(path).unlink(missing_ok=True)


def check(path: str, max_age_s: float) -> tuple[bool, str]:
    """Whether the heartbeat at `path` is younger than `max_age_s`, and why not."""
    try:
        age = time.time() - Path(path).stat().st_mtime
    except FileNotFoundError:
        return False, f"{path}: no heartbeat yet (model loading, or the data plane is not running)"
    if age > max_age_s:
        return False, f"{path}: last heartbeat {age:.0f} s ago (limit {max_age_s:.0f} s)"
    return True, f"{path}: alive ({age:.1f} s ago)"
