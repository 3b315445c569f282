"""CPU benchmarks of the NumPy reference (meaningful on any machine; small shapes).

    pytest benchmarks/test_bench_reference.py --benchmark-autosave
    pytest benchmarks/test_bench_reference.py --benchmark-compare --benchmark-compare-fail=median:10%
"""

import numpy as np
import pytest

import oscar

SHAPE = (1, 8, 2048, 128)  # batch, num_kv_heads, seq_len, head_dim


@pytest.fixture(scope="module")
def kvq():
    rng = np.random.default_rng(0)
    k = rng.standard_normal(SHAPE).astype(np.float32)
    v = rng.standard_normal(SHAPE).astype(np.float32)
    q = rng.standard_normal((1, 32, 1, 128)).astype(np.float32)
    return k, v, q


def test_reference_quantize_kv(benchmark, kvq):
    k, v, _ = kvq
    cache = benchmark(oscar.quantize_kv, k, v)
    benchmark.extra_info.update(tokens=SHAPE[2], bits_per_element=cache.bits_per_element)


def test_reference_decode_attention(benchmark, kvq):
    k, v, q = kvq
    cache = oscar.quantize_kv(k, v)
    out = benchmark(oscar.decode_attention, q, cache)
    assert out.shape == q.shape


def test_reference_dequantize_kv(benchmark, kvq):
    k, v, _ = kvq
    cache = oscar.quantize_kv(k, v)
    benchmark(oscar.dequantize_kv, cache)
