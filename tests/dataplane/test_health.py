"""The data plane's heartbeat file and `python -m dataplane.healthcheck` (used by compose)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dataplane.health import Heartbeat, check

ROOT = Path(__file__).resolve().parents[2]


def test_heartbeat_lifecycle(tmp_path: Path) -> None:
    path = tmp_path / "hb" / "dataplane.health"
    assert not check(str(path), 10)[0]
    beat = Heartbeat(str(path), interval_s=0.0)
    beat.beat()
    assert check(str(path), 10)[0]
    old = time.time() - 100
    os.utime(path, (old, old))
    ok, why = check(str(path), 10)
    assert not ok and "ago" in why
    beat.close()
    assert not path.exists()
    Heartbeat(None).beat()  # no file configured: nothing happens


def test_healthcheck_command(tmp_path: Path) -> None:
    path = tmp_path / "dataplane.health"
    cmd = [sys.executable, "-m", "dataplane.healthcheck", "--file", str(path), "--max-age", "30"]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=60).returncode == 1
    Heartbeat(str(path)).beat()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "alive" in done.stdout
