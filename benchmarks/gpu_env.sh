# Sourced by the GPU session scripts (benchmarks/gpu_*.sh): $OUT, the environment, the kernel
# cache carried between device runs, the install, and the GPU's name. Nothing here runs a test.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OSCAR_CACHE_DIR=${OSCAR_CACHE_DIR:-/tmp/oscar-kernel-cache}
# A kernel cache carried from an earlier run (device tool: carry .gpucache) saves the compiles;
# the cache checks every entry, so a stale archive only costs recompiles.
if [[ -f .gpucache/kcache.tgz && ! -d $OSCAR_CACHE_DIR ]]; then
  mkdir -p "$OSCAR_CACHE_DIR" && tar -xzf .gpucache/kcache.tgz -C "$OSCAR_CACHE_DIR"
fi
trap 'tar -czf "$OUT/kcache.tgz" -C "$OSCAR_CACHE_DIR" . 2>/dev/null' EXIT
# (the device tool returns at most 8 files from $OUT: the install log stays in /tmp)
python3 -m pip install -q --no-build-isolation --no-deps -e . >/tmp/oscar-install.log 2>&1 || {
  tail -20 /tmp/oscar-install.log; exit 1; }
# transformers' QuantizedCache backends for generate.py's quanto*/hqq* kinds: wheels carried in
# .whl (device tool: carry .whl; the machine has no package index), installed without deps
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl >/tmp/oscar-wheels.log 2>&1 \
    || echo "carried wheels: install failed (tail /tmp/oscar-wheels.log)"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
