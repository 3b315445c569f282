#!/usr/bin/env bash
# A short device-tool call (about 3 minutes with a carried kernel cache, .gpucache/kcache.tgz):
# the paged and transformers-integration GPU tests in parallel, then one generate() case.
#   bash benchmarks/gpu_session_short.sh [scale]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S=${1:-1}
cap() { python3 -c "print(int($1 * $S))"; }
PY="python3 -m pytest -q -p no:cacheprovider -rf"
t0=$SECONDS
timeout -s INT -k 10 "$(cap 70)" $PY tests/test_paged_cuda.py tests/test_kernels_paged.py \
  >/tmp/t_paged.log 2>&1 &
timeout -s INT -k 10 "$(cap 70)" $PY tests/test_integration_gpu.py >/tmp/t_int.log 2>&1 &
wait
echo "== tests $((SECONDS - t0)) s" | tee "$OUT/session.log"
cat /tmp/t_paged.log /tmp/t_int.log >"$OUT/tests.log"
grep -E "passed|failed|FAILED|^E  " /tmp/t_paged.log /tmp/t_int.log | cut -c1-220 | tail -14 \
  | tee -a "$OUT/session.log"
t0=$SECONDS
timeout "$(cap 100)" python3 benchmarks/generate.py --out "$OUT" --cases 1x8192 --new 16 \
  --kinds oscar,dynamic >/tmp/gen.log 2>&1
echo "== generate exit $? $((SECONDS - t0)) s" | tee -a "$OUT/session.log"
tail -n 8 /tmp/gen.log | cut -c1-400 | tee -a "$OUT/session.log"
