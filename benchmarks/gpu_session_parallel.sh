#!/usr/bin/env bash
# One device-tool call of about 9 minutes for what gpu_session.sh leaves unfinished: on a fresh
# machine every GPU test file spends most of its time compiling its kernel variants (10-20 s
# each, one core each), so the test files run here as parallel pytest processes (the machine
# has 16 cores; the kernel cache on disk is shared), beside an oscar.warmup of the Llama-3.1-8B
# decode shapes; then the end-to-end generate() benchmark runs alone on the GPU.
#   bash benchmarks/gpu_session_parallel.sh [scale]   (scale multiplies every cap; default 1)
# At most 8 files land in $OUT: session.log, tests_a.log, tests_b.log, generate.{md,json}.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S=${1:-1}
cap() { python3 -c "print(int($1 * $S))"; }
LOG="$OUT/session.log"
step() { echo "== $1: exit $2 in $3 s" | tee -a "$LOG"; }
T=$(cap 280)
PY="python3 -m pytest -q -p no:cacheprovider -rf"

t0=$SECONDS
run_tests() {  # name, pytest arguments...
  local name=$1; shift
  timeout -s INT -k 15 "$T" $PY "$@" >"/tmp/t_$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s" >>"/tmp/t_$name.log"
}
run_tests compile tests/test_graph_step.py -k "torch_compile or opcheck" &
run_tests paged tests/test_kernels_paged.py tests/test_paged_cuda.py &
run_tests integration tests/test_integration_gpu.py &
run_tests bridge tests/test_gpu_bridge.py -k "underflow or overflow or nonfinite or 64_rows" &
# the multi-row cases compile their own kernels (about 30 s each): three processes
run_tests multirow tests/test_kernels_attention.py -k "multirow and (rg2 or v1)" &
run_tests multirow_rg4 tests/test_kernels_attention.py -k "multirow and rg4" &
run_tests multirow_rb tests/test_kernels_attention.py -k "multirow and rb" &
timeout "$T" python3 -c "import oscar; oscar.warmup(num_kv_heads=8, head_dim=128, \
num_q_heads=32, dtype='bfloat16', batch_sizes=(1, 8), q_lens=(1,))" >/tmp/t_warm.log 2>&1 &
wait
step tests_parallel 0 $((SECONDS - t0))
for n in compile paged bridge; do
  { echo "##### $n"; cat "/tmp/t_$n.log"; } >>"$OUT/tests_a.log"
done
for n in integration multirow multirow_rg4 multirow_rb warm; do
  { echo "##### $n"; cat "/tmp/t_$n.log"; } >>"$OUT/tests_b.log"
done
for n in compile paged integration bridge multirow multirow_rg4 multirow_rb; do
  echo "-- $n" | tee -a "$LOG"
  grep -E "^== |passed|failed|FAILED|^E  " "/tmp/t_$n.log" | cut -c1-220 | tail -8 | tee -a "$LOG"
done
tail -n 3 /tmp/t_warm.log | tee -a "$LOG"

t0=$SECONDS
timeout "$(cap 250)" python3 benchmarks/generate.py --out "$OUT" --cases 1x8192,8x8192 \
  --new 32 --kinds dynamic,oscar,oscar_graph,static >/tmp/generate.log 2>&1
step generate $? $((SECONDS - t0)); tail -n 25 /tmp/generate.log | cut -c1-300 | tee -a "$LOG"
