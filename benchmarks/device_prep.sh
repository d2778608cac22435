#!/usr/bin/env bash
# Run once here (not on the GPU machine), from the repo root, before GPU runs: fills the git-ignored
# .whl/ with every wheel the GPU image lacks or has too old (the OTLP exporter, gRPC health and
# reflection, a grpcio/protobuf as new as the generated code needs, tqdm, llguidance) and copies the full Azure
# traces to .whl/traces (../shared does not travel). Then each device call carries [".whl"] and
# starts with `. benchmarks/gpu_env.sh`; serving runs take `--trace-dir .whl/traces`.
# After the first call that built flashinfer's kernels, copy its $OUT/fi-cache.tgz and $OUT/triton-cache.tgz to .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
# unpinned: the newest of each, like the opentelemetry-sdk and -api that device-wheels fetches
../shared/tools/device-wheels opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common \
  opentelemetry-proto googleapis-common-protos grpcio grpcio-health-checking grpcio-reflection protobuf tqdm
# structured outputs' grammar engine (control plane); an abi3 wheel for glibc 2.31+, which device-wheels'
# platform list does not name
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 -d .whl llguidance
mkdir -p .whl/traces && cp ../shared/traces/*.csv .whl/traces/
du -sh .whl
