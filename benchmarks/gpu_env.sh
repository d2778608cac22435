# Source on the GPU machine from the repo root: installs the carried wheels (.whl/) and restores the
# flashinfer JIT cache (.whl/fi-cache.tgz) and Triton's kernel cache (.whl/triton-cache.tgz: the data plane's
# own kernels, compiled per specialisation on first use) so neither is rebuilt. Usage: . benchmarks/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws MAX_JOBS=16 FLASHINFER_CUDA_ARCH_LIST=9.0a
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$FLASHINFER_WORKSPACE_BASE" "$TRITON_CACHE_DIR"
if [ -f .whl/fi-cache.tgz ]; then tar xzf .whl/fi-cache.tgz -C "$FLASHINFER_WORKSPACE_BASE"; fi
# The cached JIT modules alone do not stop a rebuild: ninja finds each object's stored deps out of date
# (tar kept whole-second mtimes, .ninja_deps has nanoseconds), so every process rebuilt them (~200 s,
# measured on an H100, 2026-12-07). flashinfer loads a module from its AOT folder without building, so
# each cached module of this flashinfer version and arch is put there (FLASHINFER_AOT_DIR/<name>/<name>.so).
# Measured on an H100 the next lease: `serve --model qwen3-8b` ready in 23 s (231 s before), the GPU tests 22 s.
fi_version=$(ls .whl/flashinfer_python-*.whl 2>/dev/null | sed -E 's/.*flashinfer_python-([^-]+)-.*/\1/')
fi_ops="$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/$fi_version/${FLASHINFER_CUDA_ARCH_LIST//./}/cached_ops"
if [ -n "$fi_version" ] && [ -d "$fi_ops" ] && [ -d /tmp/site/flashinfer/data ]; then
  for so in "$fi_ops"/*/*.so; do
    [ -f "$so" ] || continue
    name=$(basename "$so" .so)
    mkdir -p "/tmp/site/flashinfer/data/aot/$name" && cp "$so" "/tmp/site/flashinfer/data/aot/$name/"
  done
fi
if [ -f .whl/triton-cache.tgz ]; then tar xzf .whl/triton-cache.tgz -C "$TRITON_CACHE_DIR"; fi
# save_fi_cache DIR: write the (possibly grown) caches back for the next machine (copy both files to .whl/;
# a call carries at most 64 MiB, the tracked tree included: check `du -sh .whl .` first)
save_fi_cache() {
  tar czf "$1/fi-cache.tgz" -C "$FLASHINFER_WORKSPACE_BASE" .cache
  tar czf "$1/triton-cache.tgz" -C "$TRITON_CACHE_DIR" .
}
