"""Architecture rules that must hold: the control plane never imports torch; generated code is fresh."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_control_plane_does_not_import_torch() -> None:
    code = (
        "import sys, pkgutil, importlib, controlplane, shared, dataplane.sim, dataplane.sim_worker\n"
        "for m in pkgutil.walk_packages(controlplane.__path__, 'controlplane.'):\n"
        "    importlib.import_module(m.name)\n"
        "for m in pkgutil.walk_packages(shared.__path__, 'shared.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.'))\n"
        "print(bad[:5]); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# What the generator stamps with its own version (grpcio-tools and its bundled protoc): a newer
# grpcio-tools from the registry changes these lines and nothing else, so the freshness check reads
# past them. The committed stamps stay at the oldest versions pyproject.toml allows (they are the
# minimum runtime versions the generated code checks for at import).
_STAMPS = (
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = <stamp>"),
    (re.compile(r"^# Protobuf Python Version: \S+$", re.M), "# Protobuf Python Version: <stamp>"),
    (re.compile(r"(_runtime_version\.Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,\n"), r"\1<stamp>\n"),
)


def without_version_stamps(code: str) -> str:
    for pattern, repl in _STAMPS:
        code = pattern.sub(repl, code)
    return code


def test_generated_grpc_code_is_up_to_date(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "protos/build.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    generated = tmp_path / "controlplane/protogen/duetserve/v1"
    committed = ROOT / "controlplane/protogen/duetserve/v1"
    for name in ("generation_pb2.py", "generation_pb2_grpc.py", "generation_pb2.pyi"):
        fresh = without_version_stamps((generated / name).read_text())
        assert fresh == without_version_stamps((committed / name).read_text()), f"{name} is stale: run protos/build.py"


def test_version_stamps_are_the_only_lines_read_past() -> None:
    committed = (ROOT / "controlplane/protogen/duetserve/v1/generation_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION = '" in committed
    assert without_version_stamps(committed).count("<stamp>") == 1
    pb2 = (ROOT / "controlplane/protogen/duetserve/v1/generation_pb2.py").read_text()
    assert without_version_stamps(pb2).count("<stamp>") == 2
    # a changed message or service is not a stamp
    assert without_version_stamps(committed.replace("GenerationStub", "GenerationStub2")) != \
        without_version_stamps(committed)


def test_committed_stamps_are_the_pinned_minimums() -> None:
    """The generated code refuses to import under an older grpcio / protobuf than its stamps: keep
    them at the minimums pyproject.toml declares, so every install it allows can import it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    grpc_min = re.search(r'"grpcio>=([\d.]+)"', pyproject).group(1)
    protobuf_min = re.search(r'"protobuf>=([\d.]+)"', pyproject).group(1)
    grpc_code = (ROOT / "controlplane/protogen/duetserve/v1/generation_pb2_grpc.py").read_text()
    assert f"GRPC_GENERATED_VERSION = '{grpc_min}'" in grpc_code
    stamp = re.search(r"^# Protobuf Python Version: (\S+)$",
                      (ROOT / "controlplane/protogen/duetserve/v1/generation_pb2.py").read_text(), re.M).group(1)
    assert stamp == protobuf_min
