#!/usr/bin/env bash
# One device-tool call for issue 22's end-to-end numbers: benchmarks/generate.py at 8K and 32K,
# batch 1 and 8, every cache kind (OScaRCache eager and graphed, DynamicCache, the compiled
# StaticCache, transformers' QuantizedCache with quanto/HQQ at 2 and 4 bits from the carried
# wheels), then a 128K batch-1 case. Carry .gpucache and .whl. Results: $OUT/gen_*/generate.*
#   bash benchmarks/gpu_generate.sh [scale]   (scale multiplies every cap; default 1)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S=${1:-1}
cap() { python3 -c "print(int($1 * $S))"; }
LOG="$OUT/session.log"
run() {  # name, cap seconds, generate.py arguments...
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  timeout "$(cap "$t")" python3 benchmarks/generate.py --out "$OUT/gen_$name" "$@" \
    >"/tmp/gen_$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$LOG"
  grep -E '^\| ' "$OUT/gen_$name/generate.md" 2>/dev/null | cut -c1-200 | tee -a "$LOG" \
    || tail -n 5 "/tmp/gen_$name.log" | tee -a "$LOG"
}
run compiled 300 --cases 1x8192,8x8192,1x32768,8x32768 --new 64 --kinds static,oscar_graph
run eager 150 --cases 1x8192,8x8192 --new 32 --kinds dynamic,oscar,quanto2,quanto4,hqq2,hqq4
run long 120 --cases 1x131072 --new 16 --kinds oscar_graph,oscar
# the device tool returns at most 8 files from $OUT: one archive of the three result folders
tar -czf "$OUT/generate.tgz" -C "$OUT" gen_compiled gen_eager gen_long 2>/dev/null \
  && rm -rf "$OUT"/gen_compiled "$OUT"/gen_eager "$OUT"/gen_long
