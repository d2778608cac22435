"""Regenerate the Python gRPC code for protos/ into controlplane/protogen/ (run from the repo root).

    python protos/build.py

The generated modules are committed; tests/controlplane/test_boundaries.py fails when they are stale.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["duetserve/v1/generation.proto"]


def build(out_dir: Path = ROOT) -> None:
    for proto in PROTOS:
        args = [
            "protoc",
            f"-Icontrolplane/protogen={ROOT / 'protos'}",
            f"-I{files(grpc_tools) / '_proto'}",  # google/protobuf/struct.proto
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(ROOT / "protos" / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {proto}")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
