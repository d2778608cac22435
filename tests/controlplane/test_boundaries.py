"""Architecture rules that must hold: the control plane never imports torch; generated code is fresh."""

from __future__ import annotations

import filecmp
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


def test_generated_grpc_code_is_up_to_date(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "protos/build.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    generated = tmp_path / "controlplane/protogen/duetserve/v1"
    committed = ROOT / "controlplane/protogen/duetserve/v1"
    for name in ("generation_pb2.py", "generation_pb2_grpc.py", "generation_pb2.pyi"):
        assert filecmp.cmp(generated / name, committed / name, shallow=False), f"{name} is stale: run protos/build.py"
