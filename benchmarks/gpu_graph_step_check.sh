#!/usr/bin/env bash
# One GPU session for issue 25 (device tool): install, the GPU tests of variable-length rows,
# per-row starts, whole-step capture and the custom ops (plus the existing decode/bridge/
# integration GPU tests that the lengths change touches), compute-sanitizer memcheck on the new
# kernels (append_rows, row flush, decode with per-row lengths), then benchmarks/graph_step.py.
# Every step has a time cap and the script goes on after a failing step; logs go to $OUT.
#   bash benchmarks/gpu_graph_step_check.sh [tests_cap_s] [bench_cap_s] [--quick]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
t0=$SECONDS
timeout -s INT -k 15 "${1:-180}" python3 -m pytest -q -p no:cacheprovider -rf tests/test_graph_step.py \
  tests/test_integration_gpu.py tests/test_gpu_runtime.py tests/test_gpu_bridge.py \
  "tests/test_kernels_attention.py::test_gpu_matches_reference" >"$OUT/tests.log" 2>&1
echo "tests exit $? in $((SECONDS - t0)) s"; grep -E "passed|failed|FAILED|^E " "$OUT/tests.log" | cut -c1-240 | tail -25
t0=$SECONDS
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q \
  -p no:cacheprovider tests/test_graph_step.py -k "overflow or continuous" >"$OUT/memcheck.log" 2>&1
echo "memcheck exit $? in $((SECONDS - t0)) s"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3
t0=$SECONDS
timeout "${2:-200}" python3 benchmarks/graph_step.py --out "$OUT/graph_step" ${3:-} >"$OUT/graph_step.log" 2>&1
echo "graph_step.py exit $? in $((SECONDS - t0)) s"; cat "$OUT/graph_step/graph_step.md" 2>/dev/null || tail -8 "$OUT/graph_step.log"
