"""The asymmetric min/max quantizer of SPEC section 3 (reference/quantize.py).

Exact: codes and params equal a scalar, loop-based transcription of SPEC section 3; ties round to
even; designed inputs (values mn + c * scale with storage-exact mn, scale) reproduce exactly,
through the quantizer and through the public API. Tolerance: the reconstruction error bound,
derived from the stored (scale, min) pair.
"""


import numpy as np
import pytest

import oscar
from oscar.reference import (
    dequantize_groups,
    dequantize_keys,
    dequantize_values,
    quantize_groups,
    quantize_keys,
    quantize_values,
    attention_dense,
)

from helpers_reference import KIVI, U32, explicit_attention

BITS = [2, 4, 8]
PARAM_DTYPES = ["float16", "float32"]
STORE = {"float16": np.float16, "float32": np.float32}


def _spec_quantize_group(group, bits, param_dtype):
    """SPEC section 3 for one group, written with float32 scalars and Python's round (half even)."""
    x = [np.float32(v) for v in group]
    levels = np.float32(2**bits - 1)
    mn, mx = min(x), max(x)
    scale = np.float32(np.float32(mx - mn) / levels)
    scale_s = STORE[param_dtype](scale)
    mn_s = STORE[param_dtype](mn)
    s32, m32 = np.float32(scale_s), np.float32(mn_s)
    codes = []
    for xi in x:
        if s32 == 0:
            codes.append(0)
            continue
        ratio = np.float32(np.float32(xi - m32) / s32)
        codes.append(int(min(max(round(float(ratio)), 0), 2**bits - 1)))
    recon = [np.float32(m32 + np.float32(np.float32(c) * s32)) for c in codes]
    return codes, (scale_s, mn_s), recon


def _random_groups(rng, n_groups, group, param_dtype):
    """Groups over many magnitudes, plus constant, two-valued and tiny-range groups."""
    top = 3e4 if param_dtype == "float16" else 1e30
    # float16 params reject groups that lie entirely below FLOAT16_TINY (tested separately)
    low = 1e-3 if param_dtype == "float16" else 1e-6
    mag = np.exp(rng.uniform(np.log(low), np.log(top), (n_groups, 1)))
    x = rng.standard_normal((n_groups, group)) * mag / 4 + rng.standard_normal((n_groups, 1)) * mag
    x[0] = 0.0
    x[1] = 0.37  # constant, not float16-exact
    x[2] = np.where(np.arange(group) % 2, 5.0, -5.0)
    x[3] = 1000.0 + rng.uniform(0, 1e-6, group)  # range far below the float16 ulp of 1000
    x[4] = rng.uniform(0, 1e-9, group)  # scale underflows float16 (float32: no underflow)
    if param_dtype == "float16":  # the scale underflows, the group's magnitude does not
        x[4] += 1e-4
    return np.clip(x, -top, top).astype(np.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
def test_quantizer_matches_scalar_transcription(bits, param_dtype):
    rng = np.random.default_rng(bits)
    x = _random_groups(rng, 40, 32, param_dtype)
    codes, params = quantize_groups(x, bits, param_dtype)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    assert params.dtype == STORE[param_dtype] and params.shape == (40, 2)
    recon = dequantize_groups(codes, params)
    assert recon.dtype == np.float32
    for g in range(x.shape[0]):
        c, (scale_s, mn_s), r = _spec_quantize_group(x[g], bits, param_dtype)
        assert list(codes[g]) == c, g
        assert params[g, 0] == scale_s and params[g, 1] == mn_s
        assert np.array_equal(recon[g], np.array(r, np.float32)), g


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
def test_codes_in_range_and_error_bound(bits, param_dtype):
    rng = np.random.default_rng(10 + bits)
    x = _random_groups(rng, 300, 64, param_dtype)
    codes, params = quantize_groups(x, bits, param_dtype)
    levels = 2**bits - 1
    assert codes.max() <= levels
    x_hat = dequantize_groups(codes, params).astype(np.float64)
    x64 = x.astype(np.float64)
    scale_s = params[:, 0].astype(np.float64)[:, None]
    mn_s = params[:, 1].astype(np.float64)[:, None]
    mn = x64.min(axis=1, keepdims=True)
    mx = x64.max(axis=1, keepdims=True)
    top = mn_s + levels * scale_s
    # Codes come from the stored pair: inside [mn_s, top] the error is at most scale_s / 2; the
    # ends are clamped, which adds at most |mn - mn_s| below and max(0, mx - top) above. The
    # float32 subtraction, division and reconstruction add a few u32 of the magnitudes involved.
    slack = 4 * U32 * (np.abs(x64) + np.abs(mn_s) + levels * scale_s) + 2 * U32 * scale_s
    bound = scale_s / 2 + np.abs(mn - mn_s) + np.maximum(0.0, mx - top) + slack
    err = np.abs(x64 - x_hat)
    assert np.all(err <= bound), float((err / bound).max())
    # For ordinary (non-degenerate) groups the storage terms are small: the step dominates.
    if param_dtype == "float32":
        normal = scale_s[:, 0] > 0
        rel = err[normal] / scale_s[normal]
        assert rel.max() <= 0.5 + 1e-3


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
def test_constant_groups_reconstruct_exactly(bits, param_dtype):
    values = [0.0, -3.25, 1.5, 65504.0, -2.0**-14]
    if param_dtype == "float32":
        values += [0.1, 1e30, -7.123456]  # any float32 is storable
    x = np.array([[v] * 16 for v in values], np.float32)
    codes, params = quantize_groups(x, bits, param_dtype)
    assert np.all(codes == 0) and np.all(params[:, 0] == 0)
    assert np.array_equal(dequantize_groups(codes, params), x)


def test_constant_group_not_storable_rounds_once():
    # 0.37 is not a float16: the group reconstructs to float16(0.37), the storage rounding only.
    x = np.full((1, 32), 0.37, np.float32)
    codes, params = quantize_groups(x, 2, "float16")
    assert np.all(dequantize_groups(codes, params) == np.float32(np.float16(0.37)))


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
def test_half_way_ties_round_to_even(param_dtype):
    # 2 bits, group spans [0, 3]: scale = 1 exactly; (x - 0) / 1 = k + 0.5 exactly.
    x = np.array([[0.0, 3.0, 0.5, 1.5, 2.5, 1.0, 2.0, 2.75]], np.float32)
    codes, params = quantize_groups(x, 2, param_dtype)
    assert params[0, 0] == 1.0 and params[0, 1] == 0.0
    assert codes[0].tolist() == [0, 3, 0, 2, 2, 1, 2, 3]
    # 4 bits over [-8, 7]: scale 1, min -8, x = -8 + k + 0.5
    x4 = np.concatenate(([-8.0, 7.0], -8.0 + np.arange(15) + 0.5)).astype(np.float32)[None]
    codes4, _ = quantize_groups(x4, 4, param_dtype)
    k = np.arange(15)
    assert codes4[0, 2:].tolist() == (k + (k % 2)).tolist()  # k + 0.5 -> the even neighbour
    # 8 bits, scale 0.5 (range 127.5 / 255), ties at k + 0.5 steps
    x8 = np.concatenate(([0.0, 127.5], 0.5 * (np.arange(254) + 0.5))).astype(np.float32)[None]
    codes8, params8 = quantize_groups(x8, 8, param_dtype)
    assert params8[0, 0] == 0.5
    k = np.arange(254)
    assert codes8[0, 2:].tolist() == (k + (k % 2)).tolist()


def _designed_groups(rng, n_groups, group, bits):
    """x = mn + c * scale with float16-exact mn and scale; every group holds codes 0 and L."""
    levels = 2**bits - 1
    mn = rng.integers(-1024, 1024, (n_groups, 1)) / 16.0
    scale = rng.integers(1, 64, (n_groups, 1)) / 64.0
    c = rng.integers(0, levels + 1, (n_groups, group))
    c[:, 0], c[:, 1] = 0, levels
    return (mn + c * scale).astype(np.float32), c


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
def test_representable_inputs_reproduce_exactly(bits, param_dtype):
    rng = np.random.default_rng(20 + bits)
    x, c = _designed_groups(rng, 50, 32, bits)
    codes, params = quantize_groups(x, bits, param_dtype)
    assert np.array_equal(codes, c)
    assert np.array_equal(dequantize_groups(codes, params), x)


@pytest.mark.parametrize("key_group", [32, 64, 128])
@pytest.mark.parametrize("value_group", [16, 32, 64])
def test_key_and_value_grouping(key_group, value_group):
    # keys: one (scale, min) per channel over key_group consecutive tokens;
    # values: one per token over value_group consecutive channels.
    rng = np.random.default_rng(key_group + value_group)
    b, h, t, d = 2, 3, 2 * key_group, 64
    x = rng.standard_normal((b, h, t, d)).astype(np.float32)
    kc, kp = quantize_keys(x, 2, key_group)
    assert kc.shape == x.shape and kp.shape == (b, h, t // key_group, d, 2)
    vc, vp = quantize_values(x, 4, value_group)
    assert vc.shape == x.shape and vp.shape == (b, h, t, d // value_group, 2)
    for bi, hi, g, ch in [(0, 0, 0, 0), (1, 2, 1, 63), (1, 1, 0, 17)]:
        grp = x[bi, hi, g * key_group : (g + 1) * key_group, ch]
        c, p = quantize_groups(grp[None], 2, "float16")
        assert np.array_equal(kc[bi, hi, g * key_group : (g + 1) * key_group, ch], c[0])
        assert np.array_equal(kp[bi, hi, g, ch], p[0])
    for bi, hi, ti, g in [(0, 0, 0, 0), (1, 2, t - 1, d // value_group - 1), (0, 1, 5, 0)]:
        grp = x[bi, hi, ti, g * value_group : (g + 1) * value_group]
        c, p = quantize_groups(grp[None], 4, "float16")
        assert np.array_equal(vc[bi, hi, ti, g * value_group : (g + 1) * value_group], c[0])
        assert np.array_equal(vp[bi, hi, ti, g], p[0])
    assert np.array_equal(dequantize_keys(kc, kp),
                          dequantize_keys(*quantize_keys(x, 2, key_group)))
    x_hat = dequantize_values(vc, vp)
    assert x_hat.shape == x.shape and x_hat.dtype == np.float32


def test_float16_overflow_raises_and_float32_params_work():
    x = np.zeros((2, 32), np.float32)
    x[1, 3] = 7e4
    with pytest.raises(ValueError, match=r"^k: .*float16"):
        quantize_groups(x, 2, "float16", name="k")
    with pytest.raises(ValueError, match=r"^v: "):
        quantize_groups(-x, 2, "float16", name="v")
    codes, params = quantize_groups(x, 2, "float32")
    assert params.dtype == np.float32
    assert np.array_equal(dequantize_groups(codes, params), x)  # {0, 7e4}: codes 0 and 3
    # the float16 limit itself is storable: no error, finite params, the usual error bound
    # (scale 65504/3 rounds to 21840 in float16, so the top level lands at 65520 in float32)
    x[1, 3] = 65504.0
    codes, params = quantize_groups(x, 2, "float16")
    assert np.all(np.isfinite(params.astype(np.float32)))
    assert np.abs(dequantize_groups(codes, params) - x).max() <= 16.0
    # 3 * 2**14: scale 2**14 is exact, so the group reproduces exactly
    x[1, 3] = 49152.0
    codes, params = quantize_groups(x, 2, "float16")
    assert np.array_equal(dequantize_groups(codes, params), x)


# --- designed inputs through the public API -----------------------------------------------------


#: Designed values are integers times 2**-4 below 2**11 in magnitude: exact in float16 and float32.
_FRAC = 16.0
_INT_LIMIT = 2048


def _designed_params(rng, levels, shape):
    """Integer (min, scale) pairs with |min| + levels * scale < 2**11."""
    sc = rng.integers(1, (_INT_LIMIT // 2) // levels + 1, shape)
    mn = rng.integers(-(_INT_LIMIT // 2) + 24, (_INT_LIMIT // 2) - 24, shape)
    return mn, sc


def _designed_cache_inputs(rng, b, h, t, d, key_group, value_group, bits_k, bits_v):
    """k with every (channel, token group) = mn + c * scale, v likewise per (token, channel group).

    Every group holds codes 0 and L, so its min is mn and its scale is exactly scale.
    """
    lk, lv = 2**bits_k - 1, 2**bits_v - 1
    ng = -(-t // key_group)
    mn, sc = _designed_params(rng, lk, (b, h, ng, 1, d))
    c = rng.integers(0, lk + 1, (b, h, ng, key_group, d))
    c[:, :, :, 0], c[:, :, :, 1] = 0, lk
    k = ((mn + c * sc) / _FRAC).reshape(b, h, ng * key_group, d)[:, :, :t]
    nv = d // value_group
    mn, sc = _designed_params(rng, lv, (b, h, t, nv, 1))
    c = rng.integers(0, lv + 1, (b, h, t, nv, value_group))
    c[..., 0], c[..., 1] = 0, lv
    v = ((mn + c * sc) / _FRAC).reshape(b, h, t, d)
    return k.astype(np.float32), v.astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
@pytest.mark.parametrize("bits,key_group,value_group,t", [
    (2, 32, 32, 64 + 5), (4, 64, 16, 128), (8, 32, 64, 96 + 31), (2, 128, 32, 128 + 1),
])
def test_kivi_designed_inputs_roundtrip_exactly(dtype, param_dtype, bits, key_group,
                                                value_group, t):
    rng = np.random.default_rng(bits * key_group + t)
    b, h, d = 2, 2, 64
    cfg = oscar.OScaRConfig(key_bits=bits, value_bits=bits, key_group_size=key_group,
                            value_group_size=value_group, residual_length=key_group,
                            param_dtype=param_dtype, **KIVI)
    k, v = _designed_cache_inputs(rng, b, h, t, d, key_group, value_group, bits, bits)
    assert np.array_equal(k.astype(dtype).astype(np.float32), k)  # inputs survive the dtype
    assert np.array_equal(v.astype(dtype).astype(np.float32), v)
    k, v = k.astype(dtype), v.astype(dtype)
    cache = oscar.quantize_kv(k, v, cfg)
    assert cache.quantized_len == t // key_group * key_group
    k_hat, v_hat = oscar.dequantize_kv(cache)
    assert k_hat.dtype == dtype and v_hat.dtype == dtype
    assert np.array_equal(k_hat, k) and np.array_equal(v_hat, v)
    # attention over the cache equals dense attention over the inputs: both are float64
    # computations of the same numbers, differing only in summation order.
    q = rng.standard_normal((b, 4, 3, d)).astype(np.float32)
    out, lse = oscar.decode_attention(q, cache, return_lse=True)
    ref, ref_lse = attention_dense(q, k, v, return_lse=True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref.astype(np.float32), rtol=0, atol=4 * U32 * np.abs(v).max())
    np.testing.assert_allclose(lse, ref_lse, rtol=2 * U32)


def test_designed_inputs_match_explicit_attention():
    # the same claim against the loop-written softmax (not the reference's attention_dense)
    rng = np.random.default_rng(5)
    cfg = oscar.OScaRConfig(residual_length=32, **KIVI)
    k, v = _designed_cache_inputs(rng, 1, 2, 33, 32, 32, 32, 2, 2)
    cache = oscar.quantize_kv(k, v, cfg)
    q = rng.standard_normal((1, 2, 2, 32)).astype(np.float32)
    out = oscar.decode_attention(q, cache)
    ref, _ = explicit_attention(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=0, atol=4 * U32 * np.abs(v).max())
