"""The kernel runtime on a GPU: launch plans equal the dispatcher, the kernel cache across
processes, warm-up (``gpu`` marker; skipped without a CUDA GPU).

* Plan launches (oscar/_launch.py) give bit-identical outputs and packed bytes to dispatcher
  launches over a decode loop that crosses flushes and a capacity growth, with a fresh q and out
  every step, on a non-default stream, at several GQA ratios, q_len and dtypes.
* A CUDA graph captured around plan launches replays to the eager result.
* A fresh process with a warm kernel cache compiles nothing and gives the same bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import oscar  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(b, h, t, d, dtype, cfg, capacity=None, seed=0):
    """Two caches of the same tokens: one launching through plans, one through the dispatcher."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    k = torch.randn(b, h, t, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(b, h, t, d, device=DEV, dtype=dtype, generator=g)
    planned = oscar.quantize_kv(k, v, cfg, max_seq_len=capacity)
    plain = oscar.quantize_kv(k, v, cfg, max_seq_len=capacity)
    plain._store.plans = False
    planned._store.append_kernel = True  # the prepared append kernel (the default with plans)
    assert planned._store.plans, planned._store.plan_reason
    return planned, plain, g


def _packed_equal(a, b):
    pa, pb = a.packed(), b.packed()
    for name in ("k_codes", "k_params", "v_codes", "v_params", "norms"):
        x, y = getattr(pa, name), getattr(pb, name)
        if x is None:
            assert y is None
            continue
        assert torch.equal(x.view(torch.uint8) if x.dtype != torch.uint8 else x,
                           y.view(torch.uint8) if y.dtype != torch.uint8 else y), name
    ra, rb = a.residual(), b.residual()
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])


@pytest.mark.parametrize("gqa,q_len,dtype,cfg", [
    (4, 1, torch.bfloat16, oscar.OScaRConfig()),
    (4, 2, torch.bfloat16, oscar.OScaRConfig()),
    (8, 1, torch.float16, oscar.OScaRConfig(key_bits=4, value_bits=4)),
    (1, 1, torch.float32, oscar.OScaRConfig(norm_scope="head", param_dtype="float32")),
    (8, 4, torch.bfloat16, oscar.OScaRConfig()),  # 32 rows: v3 where it fits, else v1
])
def test_plan_launches_equal_dispatcher_launches(gqa, q_len, dtype, cfg):
    b, h, d = 2, 4, 128
    planned, plain, g = _pair(b, h, 700, d, dtype, cfg, capacity=700)
    cap0 = planned._store.capacity
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for step in range(300):  # crosses two flushes and (from capacity 768) a growth
            kn = torch.randn(b, h, 1, d, device=DEV, dtype=dtype, generator=g)
            vn = torch.randn(b, h, 1, d, device=DEV, dtype=dtype, generator=g)
            planned.append(kn, vn)
            plain.append(kn, vn)
            if step % 7 == 0 or step > 280:
                q = torch.randn(b, h * gqa, q_len, d, device=DEV, dtype=dtype, generator=g)
                o1, l1 = oscar.decode_attention(q, planned, return_lse=True)
                o2, l2 = oscar.decode_attention(q.clone(), plain, return_lse=True)
                assert torch.equal(o1, o2) and torch.equal(l1, l2), step
                assert torch.equal(oscar.decode_attention(q, planned), o1)
    torch.cuda.synchronize()
    assert planned._store.capacity > cap0, "the loop should have grown the capacity"
    assert planned._store.plans, planned._store.plan_reason
    assert planned._store._steps, "no decode step went through a plan"
    _packed_equal(planned, plain)
    planned.check()


def test_graph_of_plan_launches_replays_to_eager():
    planned, plain, g = _pair(1, 8, 4200, 128, torch.bfloat16, oscar.OScaRConfig())
    q = torch.randn(1, 32, 1, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    eager = oscar.decode_attention(q, planned).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        oscar.decode_attention(q, planned)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = oscar.decode_attention(q, planned)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert torch.equal(eager, oscar.decode_attention(q, plain))


FRESH = r"""
import json, sys, time, torch
t0 = time.perf_counter()
import oscar
from oscar.kernels_numba import kernel_cache as kc
g = torch.Generator(device="cuda").manual_seed(3)
k = torch.randn(1, 8, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=g)
v = torch.randn_like(k)
q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
cache = oscar.quantize_kv(k, v, num_q_heads=32)
out = oscar.decode_attention(q, cache)
for _ in range(130):
    cache.append(k[:, :, :1], v[:, :, :1])
out2 = oscar.decode_attention(q, cache)
torch.cuda.synchronize()
print(json.dumps({"misses": kc.stats["misses"], "hits": kc.stats["hits"],
                  "seconds": time.perf_counter() - t0,
                  "out": out.float().sum().item(), "out2": out2.float().sum().item(),
                  "codes": int(cache.packed().k_codes.sum().item())}))
"""


def test_fresh_process_loads_compiled_kernels(tmp_path):
    env = dict(os.environ, OSCAR_CACHE_DIR=str(tmp_path / "kc"))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", FRESH], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["misses"] > 0
    assert warm["misses"] == 0 and warm["hits"] == cold["misses"] + cold["hits"]
    for key in ("out", "out2", "codes"):
        assert warm[key] == cold[key]


def test_warmup_then_no_compile_in_the_loop(tmp_path, monkeypatch):
    from oscar.kernels_numba import kernel_cache as kc

    info = oscar.warmup(num_kv_heads=4, head_dim=64, num_q_heads=8, dtype="float16",
                        batch_sizes=(1, 3), q_lens=(1, 2))
    assert info["kernels"] >= 4
    before = dict(kc.stats)
    k = torch.randn(3, 4, 300, 64, device=DEV, dtype=torch.float16)
    cache = oscar.quantize_kv(k, k)
    for q_len in (1, 2):
        for step in range(140):
            cache.append(k[:, :, :1], k[:, :, :1])
            oscar.decode_attention(torch.randn(3, 8, q_len, 64, device=DEV,
                                               dtype=torch.float16), cache)
    torch.cuda.synchronize()
    assert kc.stats["misses"] == before["misses"], "a kernel was compiled inside the loop"


def test_warmup_command_prepares_a_model_config(tmp_path, capsys):
    """`oscar warmup --model DIR` on a GPU: the shapes of a config.json, kernels ready."""
    import json

    from oscar import cli

    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", num_attention_heads=8, num_key_value_heads=4, hidden_size=512,
        torch_dtype="float16")))
    assert cli.main(["warmup", "--model", str(tmp_path), "--batch-sizes", "1,3",
                     "--q-lens", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "4 KV heads x 64, 8 query heads, float16" in out and "kernels ready" in out


def test_no_low_occupancy_warning_from_the_library():
    import warnings

    from numba.core.errors import NumbaPerformanceWarning

    k = torch.randn(1, 2, 200, 64, device=DEV, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as recwarn:
        warnings.simplefilter("always")
        cache = oscar.quantize_kv(k, k)
        cache._store.plans = False  # the dispatcher path is the one that could warn
        oscar.decode_attention(torch.randn(1, 2, 1, 64, device=DEV, dtype=torch.float16), cache)
        oscar.dequantize_kv(cache)
        torch.cuda.synchronize()
    assert not [w for w in recwarn if issubclass(w.category, NumbaPerformanceWarning)]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_cache_on_another_device_than_the_current_one():
    """Plans launch in the current CUDA context; a cache on cuda:1 used while cuda:0 is current
    (a model spread over GPUs) must still run on cuda:1 and equal the dispatcher."""
    g = torch.Generator(device="cuda:1").manual_seed(5)
    k = torch.randn(1, 4, 300, 64, device="cuda:1", dtype=torch.float16, generator=g)
    q = torch.randn(1, 8, 1, 64, device="cuda:1", dtype=torch.float16, generator=g)
    planned, plain = oscar.quantize_kv(k, k), oscar.quantize_kv(k, k)
    plain._store.plans = False
    with torch.cuda.device(0):
        for i in range(140):
            planned.append(k[:, :, i:i + 1], k[:, :, i:i + 1])
            plain.append(k[:, :, i:i + 1], k[:, :, i:i + 1])
        out = oscar.decode_attention(q, planned)
        assert torch.equal(out, oscar.decode_attention(q, plain))
    assert planned._store.plans and planned._store._steps
