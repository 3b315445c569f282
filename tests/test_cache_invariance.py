"""SPEC section 4: the packed cache does not depend on how the tokens arrived.

Quantizing T tokens at once, appending them one by one, or in any chunking gives identical packed
bytes (every array of ``cache.packed().arrays()``), identical residual tokens, and identical
decode_attention outputs. T runs over the off-by-one lengths around the residual window R.
"""

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oscar

from helpers_reference import assert_same_packed, make_kv, make_q

#: (name, config kwargs, batch, num_kv_heads, head_dim); R is the config's residual_length.
CASES = {
    "default_r32_d32": (dict(residual_length=32), 2, 2, 32),
    "int4k_head_fp32_r64_d64": (dict(key_bits=4, residual_length=64, norm_scope="head",
                                     param_dtype="float32", value_group_size=16), 3, 2, 64),
    "kivi_kg64_r64_d64": (dict(key_group_size=64, residual_length=64, rotate_keys=False,
                               scale_tokens=False, rotate_values=False, value_bits=4), 1, 3, 64),
    "default_r128_d32": (dict(), 1, 2, 32),  # the paper's R = 128
}


def _lengths(r):
    return [r - 1, r, r + 1, 3 * r + 5]


@functools.lru_cache(maxsize=None)
def _inputs(case, t):
    kw, b, h, d = CASES[case]
    cfg = oscar.OScaRConfig(**kw)
    k, v = make_kv(b, h, t, d, seed=t)
    return cfg, k, v


@functools.lru_cache(maxsize=None)
def _at_once(case, t):
    cfg, k, v = _inputs(case, t)
    return oscar.quantize_kv(k, v, cfg)


def _chunked(cfg, k, v, sizes):
    b, h, _, d = k.shape
    cache = oscar.QuantizedKVCache.empty(b, h, d, "float32", cfg)
    pos = 0
    for n in sizes:
        assert cache.append(k[:, :, pos : pos + n], v[:, :, pos : pos + n]) is cache
        pos += n
        r = cfg.residual_length
        assert cache.seq_len == pos
        assert cache.quantized_len == pos // r * r and cache.residual_len == pos % r
    assert pos == k.shape[2]
    return cache


def _assert_same_attention(a, b, num_q_heads_factor=2):
    t = a.seq_len
    for q_len in sorted({1, min(3, t)}):
        q = make_q(a.batch, a.num_kv_heads * num_q_heads_factor, q_len, a.head_dim, seed=t)
        oa, la = oscar.decode_attention(q, a, return_lse=True)
        ob, lb = oscar.decode_attention(q, b, return_lse=True)
        assert np.array_equal(oa, ob) and np.array_equal(la, lb)


def _params():
    return [(case, t) for case, (kw, *_rest) in CASES.items()
            for t in _lengths(kw.get("residual_length", 128))]


@pytest.mark.parametrize("case,t", _params())
def test_one_by_one_equals_at_once(case, t):
    cfg, k, v = _inputs(case, t)
    ref = _at_once(case, t)
    r = cfg.residual_length
    assert ref.quantized_len == t // r * r and ref.residual_len == t % r
    one = _chunked(cfg, k, v, [1] * t)
    assert_same_packed(ref, one)
    _assert_same_attention(ref, one)
    k1, v1 = oscar.dequantize_kv(one)
    k0, v0 = oscar.dequantize_kv(ref)
    assert np.array_equal(k0, k1) and np.array_equal(v0, v1)


@pytest.mark.parametrize("case,t", _params())
def test_fixed_chunks_equal_at_once(case, t):
    cfg, k, v = _inputs(case, t)
    r = cfg.residual_length
    # chunks that straddle window borders, fill one exactly, and cover several windows at once
    sizes, left = [], t
    for n in [r - 1, 2, r, 2 * r + 3, 1, 7]:
        n = min(n, left)
        if n:
            sizes.append(n)
            left -= n
    if left:
        sizes.append(left)
    cache = _chunked(cfg, k, v, sizes)
    assert_same_packed(_at_once(case, t), cache)
    _assert_same_attention(_at_once(case, t), cache)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_chunkings_equal_at_once(data):
    case = data.draw(st.sampled_from(sorted(CASES)), label="case")
    r = CASES[case][0].get("residual_length", 128)
    t = data.draw(st.sampled_from(_lengths(r)), label="seq_len")
    cuts = data.draw(st.sets(st.integers(1, t - 1), max_size=12), label="cuts") if t > 1 else set()
    bounds = [0, *sorted(cuts), t]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    cfg, k, v = _inputs(case, t)
    cache = _chunked(cfg, k, v, sizes)
    assert_same_packed(_at_once(case, t), cache)
    _assert_same_attention(_at_once(case, t), cache)


def test_empty_then_quantize_kv_with_zero_tokens():
    cfg = oscar.OScaRConfig(residual_length=32)
    k, v = make_kv(2, 2, 0, 32)
    cache = oscar.quantize_kv(k, v, cfg)
    assert cache.seq_len == 0 and cache.nbytes == 0
    k2, v2 = make_kv(2, 2, 40, 32, seed=3)
    cache.append(k2, v2)
    assert_same_packed(cache, oscar.quantize_kv(k2, v2, cfg))


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_torch_and_numpy_inputs_give_same_bytes(dtype):
    cfg = oscar.OScaRConfig(residual_length=32)
    k, v = make_kv(1, 2, 70, 32, seed=4)
    kt = torch.from_numpy(k).to(getattr(torch, dtype))
    vt = torch.from_numpy(v).to(getattr(torch, dtype))
    from_torch = oscar.quantize_kv(kt, vt, cfg)
    assert from_torch.dtype == dtype
    # numpy sees the same values: exactly the tensor's (bfloat16 is exact in float32)
    npdt = np.float16 if dtype == "float16" else np.float32
    kn = kt.to(torch.float32).numpy().astype(npdt)
    vn = vt.to(torch.float32).numpy().astype(npdt)
    from_numpy = oscar.quantize_kv(kn, vn, cfg)
    assert_same_packed(from_torch, from_numpy)
    # torch tokens appended one by one
    one = oscar.QuantizedKVCache.empty(1, 2, 32, dtype, cfg)
    for i in range(70):
        one.append(kt[:, :, i : i + 1], vt[:, :, i : i + 1])
    assert_same_packed(from_torch, one)


def test_float16_inputs_are_rounded_before_quantization():
    # float16 caches quantize the float16 values (what a float16 cache holds), in every path
    cfg = oscar.OScaRConfig(residual_length=32)
    k, v = make_kv(1, 2, 65, 32, seed=5, dtype=np.float16)
    at_once = oscar.quantize_kv(k, v, cfg)
    one = oscar.QuantizedKVCache.empty(1, 2, 32, "float16", cfg)
    for i in range(65):
        one.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert_same_packed(at_once, one)
    k_hat, v_hat = oscar.dequantize_kv(at_once)
    assert k_hat.dtype == np.float16
    assert np.array_equal(k_hat[:, :, 64:], k[:, :, 64:])  # residual returned as stored


def test_failed_append_leaves_cache_unchanged():
    # An append rejected by the float16 range check (raised inside quantization) must not leave
    # half-appended tokens behind: the cache keeps its previous length and bytes.
    cfg = oscar.OScaRConfig(residual_length=32)
    k, v = make_kv(1, 2, 40, 32, seed=6)
    cache = oscar.quantize_kv(k, v, cfg)
    before = {n: a.copy() for n, a in cache.packed().arrays().items()}
    res_before = [a.copy() for a in cache.residual()]
    k_bad, v_bad = make_kv(1, 2, 60, 32, seed=7)
    v_bad[:, :, 50] = 1e5  # overflows float16 params in the second window of the append
    with pytest.raises(ValueError, match="v"):
        cache.append(k_bad, v_bad)
    assert cache.seq_len == 40 and cache.residual_len == 8
    after = cache.packed().arrays()
    assert all(np.array_equal(before[n], after[n]) for n in before)
    assert all(np.array_equal(a, b) for a, b in zip(res_before, cache.residual()))
    # and it keeps working: the good tokens go in as if nothing had happened
    cache.append(k_bad[:, :, :20], v_bad[:, :, :20])
    ref = oscar.quantize_kv(np.concatenate((k, k_bad[:, :, :20]), 2),
                            np.concatenate((v, v_bad[:, :, :20]), 2), cfg)
    assert_same_packed(ref, cache)
