# Source on the GPU machine from the repo root: installs the carried wheels (.whl/) and restores the
# flashinfer JIT cache (.whl/fi-cache.tgz) and Triton's kernel cache (.whl/triton-cache.tgz: the data plane's
# own kernels, compiled per specialisation on first use) so neither is rebuilt. Usage: . benchmarks/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws MAX_JOBS=16 FLASHINFER_CUDA_ARCH_LIST=9.0a
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$FLASHINFER_WORKSPACE_BASE" "$TRITON_CACHE_DIR"
if [ -f .whl/fi-cache.tgz ]; then tar xzf .whl/fi-cache.tgz -C "$FLASHINFER_WORKSPACE_BASE"; fi
if [ -f .whl/triton-cache.tgz ]; then tar xzf .whl/triton-cache.tgz -C "$TRITON_CACHE_DIR"; fi
# save_fi_cache DIR: write the (possibly grown) caches back for the next machine (copy both files to .whl/;
# a call carries at most 64 MiB, the tracked tree included: check `du -sh .whl .` first)
save_fi_cache() {
  tar czf "$1/fi-cache.tgz" -C "$FLASHINFER_WORKSPACE_BASE" .cache
  tar czf "$1/triton-cache.tgz" -C "$TRITON_CACHE_DIR" .
}
