"""The compose topology on loopback: `duetserve dataplane` on tcp with a heartbeat file, its health
check, then `duetserve serve --attach` to it, its gRPC health check and a completion."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.test_metrics import free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "controlplane.cli"]


def _wait(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        if done.returncode == 0 or time.monotonic() > deadline:
            return done
        time.sleep(0.2)


def test_attach_to_a_separate_dataplane_over_tcp(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    health_file = tmp_path / "dataplane.health"
    dataplane = subprocess.Popen([*CLI, "dataplane", "--endpoint", endpoint, "--device", "cpu", "--log-level",
                                  "WARNING", "--health-file", str(health_file)], cwd=ROOT, start_new_session=True)
    server = None
    try:
        check = [sys.executable, "-m", "dataplane.healthcheck", "--file", str(health_file), "--max-age", "10"]
        assert _wait(check, 120).returncode == 0
        server = subprocess.Popen([*CLI, "serve", "--attach", "--dataplane-endpoint", endpoint, "--port", "0",
                                   "--log-level", "WARNING"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                  start_new_session=True)
        assert server.stdout is not None
        match = re.search(r"serving tiny on 127\.0\.0\.1:(\d+)", server.stdout.readline())
        assert match
        address = f"127.0.0.1:{match.group(1)}"
        assert _wait([*CLI, "health", "--address", address], 30).returncode == 0
        out = subprocess.run([*CLI, "generate", "Hi", "--address", address, "--max-tokens", "4", "--ignore-eos"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "completion_tokens=4" in out.stderr, out.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert dataplane.wait(30) == 0  # serve --attach sent Shutdown on its way out
        assert not health_file.exists()
    finally:
        for proc in (server, dataplane):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
