"""The newcomer's path: the README's commands are the ones CI runs, and `duetserve serve` +
`duetserve generate` work as processes, shutting down cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "controlplane.cli"]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_test_command_is_what_ci_runs() -> None:
    commands = readme_commands()
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd in (ROOT / ".ci/run").read_text()
    assert any(c.endswith("duetserve serve") and "pip install" in c for c in commands)


def test_serve_generate_and_clean_shutdown() -> None:
    server = subprocess.Popen([*CLI, "serve", "--port", "0", "--log-level", "WARNING"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"serving tiny on 127\.0\.0\.1:(\d+)", line)
        assert match, f"unexpected first line: {line!r}"
        address = f"127.0.0.1:{match.group(1)}"
        out = subprocess.run([*CLI, "generate", "Hi", "--address", address, "--max-tokens", "8", "--ignore-eos"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "finish_reason=length" in out.stderr and "completion_tokens=8" in out.stderr
        health = subprocess.run([*CLI, "health", "--address", address], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
        bad = subprocess.run([*CLI, "generate", "Hi", "--address", address, "--max-tokens", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
        children = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
        assert children, "serve should have started the data plane as a child process"
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children), "the data plane outlived serve"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_help_documents_the_flags() -> None:
    out = subprocess.run([*CLI, "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    for flag in ("--model", "--port", "--host", "--max-num-batched-tokens", "--attach", "--dataplane-endpoint",
                 "--otel-exporter", "--otlp-endpoint", "--otel-file", "--metrics-port"):
        assert flag in out.stdout


def test_health_of_nothing_fails() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    out = subprocess.run([*CLI, "health", "--address", f"127.0.0.1:{port}", "--timeout", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr


def test_file_exporter_needs_a_file() -> None:
    out = subprocess.run([*CLI, "serve", "--otel-exporter", "file"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "--otel-file" in out.stderr


@pytest.mark.parametrize("command", [["simulate", "--trace"], ["bench", "serve", "--dataset", "trace", "--no-progress",
                                                             "--address", "127.0.0.1:1", "--trace"]])
def test_a_bad_trace_is_a_clear_error_before_anything_starts(command: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "notes.csv"
    bad.write_text("when,what\n1,2\n")
    for path, says in ((bad, "not an Azure LLM trace CSV"), (tmp_path / "missing.csv", "No such file")):
        out = subprocess.run([*CLI, *command, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flags, says", [(["--arrival", "trace"], "arrival times that differ")])
def test_arrival_flags_that_clash_are_a_clear_error(flags: list[str], says: str) -> None:
    out = subprocess.run([*CLI, "bench", "serve", "--dataset", "random", "--num-prompts", "3", "--request-rate", "2",
                          "--address", "127.0.0.1:1", "--no-progress", *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr


def test_scheduler_flags_reach_the_config() -> None:
    from controlplane.cli import build_parser, scheduler_config_from_args

    default = scheduler_config_from_args(build_parser().parse_args(["serve"]))
    off = scheduler_config_from_args(build_parser().parse_args(["serve", "--no-async-scheduling", "--policy", "duet",
                                                                "--max-lookahead", "4"]))
    assert default.async_scheduling and not off.async_scheduling
    assert (off.policy, off.max_lookahead) == ("duet", 4)
    assert (default.duet_slo, default.tpot_horizon, default.duet_trim) == ("tpot", 16, True)
    paper = scheduler_config_from_args(build_parser().parse_args(["serve", "--policy", "duet", "--duet-slo", "tbt",
                                                                  "--no-duet-trim", "--tpot-horizon", "8"]))
    assert (paper.duet_slo, paper.tpot_horizon, paper.duet_trim) == ("tbt", 8, False)


def _serve_tiny(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """`duetserve serve` in a session of its own, and its address once it serves."""
    server = subprocess.Popen([*CLI, "serve", "--port", "0", "--log-level", "WARNING", *flags], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert server.stdout is not None
    match = re.search(r"serving tiny on 127\.0\.0\.1:(\d+)", server.stdout.readline())
    if not match:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        raise AssertionError("serve did not start")
    return server, f"127.0.0.1:{match.group(1)}"


def _streaming(address: str, max_tokens: int) -> subprocess.Popen[str]:
    """`duetserve generate` of `max_tokens`, once its first text has come."""
    client = subprocess.Popen([*CLI, "generate", "Hi", "--address", address, "--max-tokens", str(max_tokens),
                               "--ignore-eos"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert client.stdout is not None
    client.stdout.read(1)
    return client


def test_ctrl_c_to_serves_process_group_drains_before_the_data_plane_stops() -> None:
    """Ctrl-C reaches the terminal's whole process group: the data plane serve spawned is in a session of
    its own, so a running completion finishes in the grace period instead of losing its data plane."""
    server, address = _serve_tiny("--shutdown-grace", "30")
    try:
        client = _streaming(address, 400)
        os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C in serve's terminal does
        _, err = client.communicate(timeout=60)
        assert client.returncode == 0 and "completion_tokens=400" in err, err
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_a_data_plane_that_cannot_load_its_model_says_why_in_one_line(tmp_path: Path) -> None:
    """One error line, no traceback; and the heartbeat file a previous process left is gone at once, so a
    health check never reads a data plane that is (re)loading as alive."""
    health = tmp_path / "health"
    health.write_text("123 0\n")  # a previous process's heartbeat
    done = subprocess.run([sys.executable, "-m", "dataplane", "--model", str(tmp_path), "--device", "cpu",
                           "--endpoint", f"ipc://{tmp_path}/dp.sock", "--health-file", str(health)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().endswith(f"data plane failed to start: no config.json in {tmp_path}")
    assert not health.exists()


def test_a_second_signal_ends_the_drain_at_once() -> None:
    server, address = _serve_tiny("--shutdown-grace", "120")
    try:
        client = _streaming(address, 4000)
        server.send_signal(signal.SIGTERM)  # drains: the completion could run on for 120 s
        time.sleep(0.5)
        stopped_at = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0 and time.monotonic() - stopped_at < 15
        _, err = client.communicate(timeout=30)
        assert client.returncode == 1 and "UNAVAILABLE" in err, err
        assert "the server was stopped before the request finished" in err, err  # not the grace period's end
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_port_in_use_is_named_with_the_reason(flag: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        flags = ["--port", "0", "--metrics-port", str(port)] if flag == "--metrics-port" else ["--port", str(port)]
        done = subprocess.run([*CLI, "serve", *flags, "--log-level", "WARNING"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    what = "metrics" if flag == "--metrics-port" else "gRPC"
    assert done.returncode == 1, done.stderr
    assert f"cannot serve {what} on 127.0.0.1:{port}: Address already in use" in done.stderr, done.stderr
    assert "Failed to add port" not in done.stderr, done.stderr  # gRPC's own log line: refused before it binds


def test_a_max_model_len_past_the_models_positions_is_refused_before_loading(tmp_path: Path) -> None:
    """As vLLM: not clamped with a warning, refused (before the weights load)."""
    done = subprocess.run([sys.executable, "-m", "dataplane", "--model", "tiny", "--device", "cpu",
                           "--max-model-len", "100000", "--endpoint", f"ipc://{tmp_path}/dp.sock"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "max_model_len 100000 is past the model's 4096 positions" in done.stderr


def test_serve_refuses_a_data_plane_it_did_not_start(tmp_path: Path) -> None:
    """serve (not --attach) on an endpoint another data plane already serves: its own child cannot bind,
    and the one that answers is not its child (WorkerReady.pid), so start-up fails, saying so, instead of
    serving through it, restarting its child in a loop and finally sending it Shutdown."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    health = tmp_path / "health"
    other = subprocess.Popen([*CLI, "dataplane", "--endpoint", endpoint, "--device", "cpu", "--log-level", "WARNING",
                              "--health-file", str(health)], cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not health.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        done = subprocess.run([*CLI, "serve", "--port", "0", "--dataplane-endpoint", endpoint], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert f"another data plane (pid {other.pid}) serves {endpoint}" in done.stderr, done.stderr
        time.sleep(0.5)
        assert other.poll() is None  # not told to shut down
    finally:
        if other.poll() is None:
            os.killpg(other.pid, signal.SIGKILL)
            other.wait()


def test_serve_sweeps_the_ipc_files_a_killed_server_left() -> None:
    """A SIGKILLed `serve` leaves its default socket and lock in the temp folder; the next one removes them."""
    import tempfile

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = Path(tempfile.gettempdir()) / f"duetserve-{dead.pid}.sock"
    left.write_text("")
    Path(f"{left}.lock").write_text("")
    server, _ = _serve_tiny()
    try:
        assert not left.exists() and not Path(f"{left}.lock").exists()
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(30)
