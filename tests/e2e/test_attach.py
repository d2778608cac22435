"""The compose topology on loopback: `duetserve dataplane` on tcp with a heartbeat file, its health
check, then `duetserve serve --attach` to it, its gRPC health check and a completion. The data plane is
not the attached control plane's: it outlives it, serves one control plane at a time (a second is
refused with a clear error while the first is attached) and the next one attaches once it has gone."""

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


def _attach(endpoint: str, *flags: str) -> tuple[subprocess.Popen[str], str]:
    """`serve --attach` to `endpoint`, and its gRPC address once it has shaken hands."""
    server = subprocess.Popen([*CLI, "serve", "--attach", "--dataplane-endpoint", endpoint, "--port", "0",
                               "--log-level", "WARNING", *flags], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    assert server.stdout is not None
    match = re.search(r"serving tiny on 127\.0\.0\.1:(\d+)", server.stdout.readline())
    assert match
    return server, f"127.0.0.1:{match.group(1)}"


def _generate(address: str) -> None:
    out = subprocess.run([*CLI, "generate", "Hi", "--address", address, "--max-tokens", "4", "--ignore-eos"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "completion_tokens=4" in out.stderr, out.stderr


def test_attach_to_a_separate_dataplane_over_tcp(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    health_file = tmp_path / "dataplane.health"
    dataplane = subprocess.Popen([*CLI, "dataplane", "--endpoint", endpoint, "--device", "cpu", "--log-level",
                                  "WARNING", "--health-file", str(health_file)], cwd=ROOT, start_new_session=True)
    servers: list[subprocess.Popen[str]] = []
    try:
        check = [sys.executable, "-m", "dataplane.healthcheck", "--file", str(health_file), "--max-age", "10"]
        assert _wait(check, 120).returncode == 0
        server, address = _attach(endpoint)
        servers.append(server)
        assert _wait([*CLI, "health", "--address", address], 30).returncode == 0
        _generate(address)
        second = subprocess.run([*CLI, "serve", "--attach", "--dataplane-endpoint", endpoint, "--port", "0",
                                 "--handshake-timeout", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "another control plane is attached" in second.stderr, second.stderr
        _generate(address)  # the first is undisturbed
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        time.sleep(0.5)
        assert dataplane.poll() is None  # not its to stop: the data plane serves on
        server, address = _attach(endpoint)  # the next control plane attaches
        servers.append(server)
        _generate(address)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        dataplane.send_signal(signal.SIGTERM)
        assert dataplane.wait(30) == 0
        assert not health_file.exists()
    finally:
        for proc in (*servers, dataplane):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
