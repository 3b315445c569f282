source benchmarks/gpu_env.sh
PY="python3 -m pytest -q -p no:cacheprovider -rf"
t0=$SECONDS
timeout -s INT -k 10 110 $PY tests/test_paged_cuda.py tests/test_kernels_paged.py > /tmp/t_paged.log 2>&1 &
timeout -s INT -k 10 110 $PY tests/test_integration_gpu.py > /tmp/t_int.log 2>&1 &
wait
echo "== tests $((SECONDS-t0)) s"
cat /tmp/t_paged.log /tmp/t_int.log > $OUT/tests.log
grep -E "passed|failed|FAILED|^E  " /tmp/t_paged.log /tmp/t_int.log | cut -c1-220 | tail -14
t0=$SECONDS
timeout 150 python3 benchmarks/generate.py --out $OUT --cases 1x8192,8x8192 --new 32 --kinds dynamic,oscar > /tmp/gen.log 2>&1
echo "== generate exit $? $((SECONDS-t0)) s"; tail -n 12 /tmp/gen.log | cut -c1-400
