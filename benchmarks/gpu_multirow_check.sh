#!/usr/bin/env bash
# One GPU session for issue 26 (multi-token decode, v3 row groups and row blocks): install; the kernels of the
# tests and of the benchmark compiled in parallel processes (warm_tests.py, multirow.py
# --warm-only); the multi-row GPU tests and the v3 regression cases of <= 8 rows; with SANITIZE=1
# compute-sanitizer (memcheck + racecheck) on one row-group case; then benchmarks/multirow.py.
# Every step has a time cap and the script goes on after a failing step; logs and results go to
# $OUT (default ./gpu_out).
#   bash benchmarks/gpu_multirow_check.sh [tests_cap_s] [bench_cap_s] [bench args...]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
TESTS_CAP=${1:-120}; BENCH_CAP=${2:-150}; shift $(( $# < 2 ? $# : 2 ))
t0=$SECONDS
# compile the tests' and the benchmark's kernels at once (16 processes; the GPU machine has 16
# cores), into the kernel cache the later steps load from
timeout 180 python3 benchmarks/multirow.py --warm 8 --warm-only "$@" >"$OUT/warm_bench.log" 2>&1 &
timeout 180 python3 benchmarks/warm_tests.py --workers 8 >"$OUT/warm_tests.log" 2>&1
echo "warm_tests exit $? in $((SECONDS - t0)) s"; tail -1 "$OUT/warm_tests.log"
wait; echo "warm (benchmark) done in $((SECONDS - t0)) s"; tail -1 "$OUT/warm_bench.log"
t0=$SECONDS
timeout -s INT -k 15 "$TESTS_CAP" python3 -m pytest -q -p no:cacheprovider -rf tests/test_kernels_attention.py \
  -k "multirow or (split-v3 and test_gpu_matches_reference and (llama-32k-bf16 or qlen2))" \
  >"$OUT/tests.log" 2>&1
echo "tests exit $? in $((SECONDS - t0)) s"; grep -E "passed|failed|FAILED|^E " "$OUT/tests.log" | cut -c1-240 | tail -20
t0=$SECONDS
[[ ${SANITIZE:-0} == 1 ]] && for tool in memcheck racecheck; do
  timeout 60 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q \
    -p no:cacheprovider tests/test_kernels_attention.py -k "multirow and (rg2-gqa1-qlen9 or rb2-gqa8)" \
    >"$OUT/$tool.log" 2>&1
  echo "$tool exit $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/$tool.log" | tail -3
done
echo "sanitizers in $((SECONDS - t0)) s"
t0=$SECONDS
timeout "$BENCH_CAP" python3 benchmarks/multirow.py --warm 0 --out "$OUT/multirow" "$@" \
  >"$OUT/multirow.log" 2>&1
echo "multirow.py exit $? in $((SECONDS - t0)) s"
cat "$OUT/multirow/multirow.md" 2>/dev/null || tail -30 "$OUT/multirow.log"
