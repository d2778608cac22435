# Source on the GPU machine from the repo root: installs the carried wheels (.whl/) and restores the
# flashinfer JIT cache (.whl/fi-cache.tgz) so kernels are not rebuilt. Usage: . benchmarks/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws MAX_JOBS=16 FLASHINFER_CUDA_ARCH_LIST=9.0a
mkdir -p "$FLASHINFER_WORKSPACE_BASE"
if [ -f .whl/fi-cache.tgz ]; then tar xzf .whl/fi-cache.tgz -C "$FLASHINFER_WORKSPACE_BASE"; fi
# save_fi_cache DIR: write the (possibly grown) cache back for the next machine
save_fi_cache() { (cd "$FLASHINFER_WORKSPACE_BASE" && tar czf "$1/fi-cache.tgz" .cache); }
