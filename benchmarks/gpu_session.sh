#!/usr/bin/env bash
# The whole GPU verification of the runtime (issue 21), the device lengths and whole-step capture
# (issue 25), the multi-row kernel (issue 26), the paged cache (27) and the newcomer fixes (23) in
# one device-tool call of about 6-7 minutes: the kernels of every step compiled first in
# parallel processes (the machine has 16 cores; one kernel takes 5-10 s), then the GPU tests in
# priority order, then short benchmarks. Every step has a time cap and the script goes on after a
# failing step; at most 8 files land in $OUT (the device tool's limit).
# pytest steps get SIGINT at their cap, so that pytest still prints the failures it has seen.
#   bash benchmarks/gpu_session.sh [scale]   (scale multiplies every cap; default 1)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
mkdir -p /tmp/bench
S=${1:-1}
cap() { python3 -c "print(int($1 * $S))"; }
LOG="$OUT/session.log"
step() { echo "== $1: exit $2 in $3 s" | tee -a "$LOG"; }

# 1. compile in parallel: the multi-row test and benchmark kernels, the Llama decode variants,
#    and the shapes of the capture / runtime tests (oscar.warmup)
t0=$SECONDS
W=$(cap 100)
timeout "$W" python3 benchmarks/warm_tests.py --workers 6 >/tmp/warm1.log 2>&1 &
timeout "$W" python3 benchmarks/multirow.py --warm 4 --warm-only --shapes 8x131072 >/tmp/warm2.log 2>&1 &
for spec in "2 128 8 bfloat16 3" "8 128 32 bfloat16 1" "8 128 32 bfloat16 8" "4 64 16 float16 1"; do
  set -- $spec
  timeout "$W" python3 -c "import oscar; oscar.warmup(num_kv_heads=$1, head_dim=$2, num_q_heads=$3, dtype='$4', batch_sizes=($5,), q_lens=(1, 2))" >>/tmp/warm3.log 2>&1 &
done
wait
step warm 0 $((SECONDS - t0)); tail -n 2 /tmp/warm1.log /tmp/warm2.log /tmp/warm3.log | tee -a "$LOG"

# 2. tests, most important first
t0=$SECONDS
timeout -s INT -k 15 "$(cap 110)" python3 -m pytest -q -p no:cacheprovider -rf tests/test_graph_step.py \
  tests/test_kernels_varlen.py "tests/test_gpu_runtime.py::test_fresh_process_loads_compiled_kernels" \
  "tests/test_gpu_runtime.py::test_plan_launches_equal_dispatcher_launches" \
  >"$OUT/tests_capture.log" 2>&1
step tests_capture $? $((SECONDS - t0)); grep -E "passed|failed|FAILED|^E " "$OUT/tests_capture.log" | cut -c1-200 | tail -12 | tee -a "$LOG"
t0=$SECONDS
timeout -s INT -k 15 "$(cap 80)" python3 -m pytest -q -p no:cacheprovider -rf tests/test_kernels_attention.py \
  -k "multirow or (split-v3 and test_gpu_matches_reference and (llama-32k-bf16 or qlen2))" \
  >"$OUT/tests_multirow.log" 2>&1
step tests_multirow $? $((SECONDS - t0)); grep -E "passed|failed|FAILED|^E " "$OUT/tests_multirow.log" | cut -c1-200 | tail -8 | tee -a "$LOG"
t0=$SECONDS
timeout -s INT -k 15 "$(cap 60)" python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_bridge.py \
  -k "underflow or overflow or nonfinite" >"$OUT/tests_other.log" 2>&1
step tests_bridge $? $((SECONDS - t0)); grep -E "passed|failed|FAILED|^E " "$OUT/tests_other.log" | cut -c1-200 | tail -6 | tee -a "$LOG"
t0=$SECONDS
# (-k above applies to every file of its run: these run without it)
timeout -s INT -k 15 "$(cap 60)" python3 -m pytest -q -p no:cacheprovider -rf tests/test_integration_gpu.py \
  tests/test_paged_cuda.py tests/test_kernels_paged.py >>"$OUT/tests_other.log" 2>&1
step tests_integration_paged $? $((SECONDS - t0)); grep -E "passed|failed|FAILED|^E " "$OUT/tests_other.log" | cut -c1-200 | tail -8 | tee -a "$LOG"

# 3. short benchmarks
t0=$SECONDS
timeout "$(cap 50)" python3 benchmarks/multirow.py --warm 0 --shapes 8x131072 --out /tmp/bench \
  >/tmp/multirow.log 2>&1
step multirow $? $((SECONDS - t0)); tail -n 25 /tmp/multirow.log | tee -a "$LOG"
t0=$SECONDS
timeout "$(cap 60)" python3 benchmarks/graph_step.py --quick --out /tmp/bench >/tmp/graph_step.log 2>&1
step graph_step $? $((SECONDS - t0)); tail -n 20 /tmp/graph_step.log | tee -a "$LOG"
t0=$SECONDS
timeout "$(cap 40)" python3 benchmarks/runtime.py --quick --skip cold,loop,eager --out /tmp/bench \
  >/tmp/runtime.log 2>&1
step runtime $? $((SECONDS - t0)); tail -n 16 /tmp/runtime.log | tee -a "$LOG"
cp /tmp/bench/*.md "$OUT/" 2>/dev/null
