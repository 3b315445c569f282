#!/usr/bin/env bash
# One GPU session for the runtime and the transformers integration (device tool): install, the
# GPU tests of the runtime/bridge/integration, compute-sanitizer memcheck on the plan path, then
# benchmarks/runtime.py and benchmarks/generate.py. Every step has a time cap and the script goes
# on after a failing step; logs and results go to $OUT (default ./gpu_out).
#   bash benchmarks/gpu_runtime_check.sh [tests_cap_s] [bench_cap_s] [generate_cap_s|skip]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
t0=$SECONDS
timeout -s INT -k 15 "${1:-240}" python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_runtime.py \
  tests/test_kernels_append.py tests/test_integration_gpu.py tests/test_gpu_bridge.py \
  tests/test_paged_cuda.py \
  >"$OUT/tests.log" 2>&1
echo "tests exit $? in $((SECONDS - t0)) s"; grep -E "passed|failed|FAILED|^E " "$OUT/tests.log" | cut -c1-240 | tail -20
t0=$SECONDS
timeout 70 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 python3 -m pytest -q \
  -p no:cacheprovider tests/test_gpu_runtime.py -k "plan_launches and dtype0" >"$OUT/memcheck.log" 2>&1
echo "memcheck exit $? in $((SECONDS - t0)) s"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3
t0=$SECONDS
timeout "${2:-200}" python3 benchmarks/runtime.py --out "$OUT/runtime" --profile >"$OUT/runtime.log" 2>&1
echo "runtime.py exit $? in $((SECONDS - t0)) s"; cat "$OUT/runtime/runtime.md" 2>/dev/null
[[ ${3:-150} == skip ]] && exit 0
t0=$SECONDS
timeout "${3:-150}" python3 benchmarks/generate.py --out "$OUT/generate" >"$OUT/generate.log" 2>&1
echo "generate.py exit $? in $((SECONDS - t0)) s"; cat "$OUT/generate/generate.md" 2>/dev/null || tail -5 "$OUT/generate.log"
