#!/usr/bin/env bash
# GPU verification run (device tool): install, run the whole test suite on the GPU (kernel
# property tests run on the device, not in the simulator), then compute-sanitizer memcheck and
# racecheck on the kernel tests at small sizes. Logs go to $OUT (or ./gpu_out).
#   bash benchmarks/gpu_check.sh [tests|sanitize|all] [extra pytest args]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || {
  cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, numba, numpy; print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/ "$@" 2>&1 | tee "$OUT/tests.log" | tail -40
  rc=${PIPESTATUS[0]}
fi
if [[ $what == sanitize || $what == all ]]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
      -m "not gpu" tests/test_kernels_quantize.py tests/test_kernels_attention.py -x "$@" >"$OUT/$tool.log" 2>&1
    src=$?; echo "compute-sanitizer $tool exit $src"; tail -5 "$OUT/$tool.log"
    [[ $src -ne 0 ]] && rc=$src
  done
fi
exit $rc
