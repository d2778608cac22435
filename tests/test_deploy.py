"""Deployment files: compose.yaml validates against the Compose specification (the compose-spec JSON
schema that check-jsonschema ships as `vendor.compose-spec`, so no Docker engine is needed), its
services are wired as the README says, every command in it parses with our own CLIs, and the
Dockerfile installs exactly as the README does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from controlplane.cli import build_parser, configs_from_args
from dataplane.__main__ import build_parser as dataplane_parser
from tests.e2e.test_cli import readme_commands

ROOT = Path(__file__).resolve().parents[1]
CHECK = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _interpolate(arg: str) -> str:
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", arg)


def test_compose_matches_the_compose_spec(tmp_path: Path) -> None:
    done = subprocess.run([*CHECK, str(ROOT / "compose.yaml")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  x:\n    image: a\n    depends_on: {y: {condition: when_i_feel_like_it}}\n")
    done = subprocess.run([*CHECK, str(broken)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1  # the validator does reject what the spec does not allow


def test_services_are_wired_for_gpu_cpu_and_tracing() -> None:
    services = compose()["services"]
    assert {"dataplane", "controlplane", "jaeger", "dataplane-cpu", "controlplane-cpu"} <= set(services)
    (gpu,) = services["dataplane"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    for plane, data in (("controlplane", "dataplane"), ("controlplane-cpu", "dataplane-cpu")):
        assert services[plane]["depends_on"][data] == {"condition": "service_healthy"}
        assert services[plane]["healthcheck"]["test"][1:3] == ["duetserve", "health"]
        assert "dataplane.healthcheck" in services[data]["healthcheck"]["test"]
        assert f"tcp://{data}:5555" in services[plane]["command"]
    assert "deploy" not in services["dataplane-cpu"] and services["dataplane-cpu"]["profiles"] == ["cpu"]
    cpu = services["dataplane-cpu"]["command"]
    assert cpu[cpu.index("--model") + 1] == "tiny" and cpu[cpu.index("--device") + 1] == "cpu"
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one") and jaeger["environment"]["COLLECTOR_OTLP_ENABLED"]
    assert {"4317:4317", "16686:16686"} <= set(jaeger["ports"])
    grace = build_parser().parse_args(["serve"]).shutdown_grace
    for name, service in services.items():
        if name != "jaeger":  # Docker's SIGKILL comes after the drain, and PID 1 forwards the SIGTERM
            assert service["init"] is True and int(service["stop_grace_period"].rstrip("s")) > grace, name
    env = services["controlplane"]["environment"]
    assert env["OTEL_TRACES_EXPORTER"] == "otlp" and env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"


def test_every_command_parses_with_our_clis() -> None:
    for name, service in compose()["services"].items():
        if "command" not in service:
            continue
        argv = [_interpolate(a) for a in service["command"]]
        assert argv[0] == "duetserve", name
        if argv[1] == "dataplane":
            args = dataplane_parser().parse_args(argv[2:])
            assert args.endpoint == "tcp://0.0.0.0:5555" and args.health_file
        else:
            args = build_parser().parse_args(argv[1:])
            assert args.command == "serve" and args.attach and args.host == "0.0.0.0"
            configs_from_args(args)  # the remote data-plane endpoint is explicitly allowed
        health = service["healthcheck"]["test"][1:]
        if health[0] == "duetserve":
            assert build_parser().parse_args(health[1:]).command == "health"


def test_dockerfile_installs_as_the_readme_says() -> None:
    setup = next(c for c in readme_commands() if c.endswith("duetserve serve") and "pip install" in c)
    install = setup.rsplit(" && ", 1)[0]  # without the final `.venv/bin/duetserve serve`
    runs = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("RUN ")]
    assert runs == [f"RUN {install}"]
    readme = (ROOT / "README.md").read_text()
    assert "docker compose up" in readme and "16686" in readme and "duetserve traces" in readme
