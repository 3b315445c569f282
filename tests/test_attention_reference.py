"""decode_attention on the reference backend: equal to exact softmax attention over dequantize_kv.

The oracle is :func:`helpers_reference.explicit_attention` (loops, math.exp), applied to
``oscar.dequantize_kv(cache)``; the library computes the same attention in float64 from the stored
(rotated, scaled) domain, rotating q instead of un-rotating the keys. The tolerance is derived in
:func:`attention_tolerance`.
"""

import math

import numpy as np
import pytest
import torch

import oscar

from helpers_reference import ABLATIONS, U32, explicit_attention, make_kv, make_q, to_f64

#: Unit roundoff of each dtype a tensor can be returned in.
UNIT_ROUNDOFF = {"float32": U32, "float16": 2.0**-11, "bfloat16": 2.0**-8, "float64": 2.0**-53}


def _dtype_name(x):
    return str(x.dtype).replace("torch.", "")


def _weights(q, k, scale):
    """Causal GQA softmax weights ``p [B, Hq, L, T]`` in float64 (for the tolerance only)."""
    q, k = to_f64(q), to_f64(k)
    group = q.shape[1] // k.shape[1]
    s = scale * np.einsum("bhld,bhtd->bhlt", q, np.repeat(k, group, axis=1))
    t, q_len = k.shape[2], q.shape[2]
    mask = np.arange(t)[None, :] <= (t - q_len + np.arange(q_len))[:, None]
    s = np.where(mask, s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_tolerance(q, k_hat, v_hat, ref_out, scale, cache_dtype, out_dtype):
    """Derived elementwise bounds ``(atol_out, atol_lse)`` of decode_attention vs the oracle.

    dequantize_kv un-rotates (and un-scales) in float32 and then rounds to the cache dtype, while
    decode_attention rotates q in float64 and reads the stored domain directly. To first order:

    * key t: the float32 FWHT and the multiply by the norm err by <= (log2 D + 3) u32 ||k_t||
      (test_reference_hadamard's bound), the rounding to the cache dtype by <= u_c |k_td| per
      element; so logit t moves by at most
      ``delta_t = scale * ((log2 D + 3) u32 ||q|| ||k_t|| + u_c sum_d |q_d k_td|)``.
    * softmax: ``dp_t = p_t (ds_t - sum_s p_s ds_s)``, so ``|dp_t| <= p_t (delta_t + dbar)`` with
      ``dbar = sum_s p_s delta_s``; lse moves by at most dbar.
    * value t: float32 FWHT and rounding, ``<= (log2 D + 2) u32 ||v_t|| + u_c |v_td|``.
    * output rounding to q's dtype: ``u_out |out|``; lse rounding to float32: ``u32 |lse|``.

    A factor 2 covers second-order terms and the float64 arithmetic on both sides.
    """
    d = q.shape[-1]
    u_c, u_out = UNIT_ROUNDOFF[cache_dtype], UNIT_ROUNDOFF[out_dtype]
    lg = math.log2(d)
    q64, k64, v64 = to_f64(q), to_f64(k_hat), to_f64(v_hat)
    group = q64.shape[1] // k64.shape[1]
    k_rep = np.repeat(k64, group, axis=1)
    v_rep = np.repeat(v64, group, axis=1)
    qn = np.linalg.norm(q64, axis=-1)[..., None]                      # [B, Hq, L, 1]
    kn = np.linalg.norm(k_rep, axis=-1)[:, :, None, :]                # [B, Hq, 1, T]
    qk_abs = np.einsum("bhld,bhtd->bhlt", np.abs(q64), np.abs(k_rep))
    delta = scale * ((lg + 3) * U32 * qn * kn + u_c * qk_abs)         # [B, Hq, L, T]
    p = _weights(q64, k64, scale)
    dbar = (p * delta).sum(axis=-1, keepdims=True)
    dp = p * (delta + dbar)
    v_err = (lg + 2) * U32 * np.linalg.norm(v_rep, axis=-1, keepdims=True) + u_c * np.abs(v_rep)
    atol_out = (np.einsum("bhlt,bhtd->bhld", dp, np.abs(v_rep))
                + np.einsum("bhlt,bhtd->bhld", p, v_err))
    atol_out = 2 * (atol_out + u_out * np.abs(ref_out))
    return atol_out, 2 * dbar[..., 0]


def _check_against_explicit(q, cache, scale=None, oracle_cache=None):
    """decode_attention (with and without lse) vs explicit attention over dequantize_kv.

    ``oracle_cache`` (default: ``cache``) is the cache whose dequantize_kv feeds the oracle: a
    float32 twin with the same packed bytes gives a float32 oracle for a half-precision cache.
    """
    oracle_cache = cache if oracle_cache is None else oracle_cache
    k_hat, v_hat = oscar.dequantize_kv(oracle_cache)
    out, lse = oscar.decode_attention(q, cache, scale=scale, return_lse=True)
    out_plain = oscar.decode_attention(q, cache, scale=scale)
    # container and dtype follow q; lse is float32 in q's container
    assert type(out) is type(q) and type(lse) is type(q) and type(out_plain) is type(q)
    assert _dtype_name(out) == _dtype_name(q) and _dtype_name(lse) == "float32"
    assert tuple(out.shape) == tuple(q.shape) and tuple(lse.shape) == tuple(q.shape[:3])
    assert np.array_equal(to_f64(out), to_f64(out_plain))
    eff_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ref_out, ref_lse = explicit_attention(q, k_hat, v_hat, eff_scale)
    atol_out, atol_lse = attention_tolerance(q, k_hat, v_hat, ref_out, eff_scale,
                                             oracle_cache.dtype, _dtype_name(q))
    err = np.abs(to_f64(out) - ref_out)
    assert np.all(err <= atol_out), float((err / atol_out).max())
    lse_err = np.abs(to_f64(lse) - ref_lse)
    assert np.all(lse_err <= atol_lse + 2 * U32 * np.abs(ref_lse)), float(lse_err.max())
    return float(err.max()), float(atol_out.max())


@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_gqa_and_causal_q_len(gqa, q_len, batch):
    num_kv_heads, d, r = 2, 64, 32
    cfg = oscar.OScaRConfig(residual_length=r)
    t = 2 * r + 5
    k, v = make_kv(batch, num_kv_heads, t, d, seed=gqa * 10 + q_len)
    cache = oscar.quantize_kv(k, v, cfg)
    q = make_q(batch, num_kv_heads * gqa, q_len, d, seed=gqa)
    _check_against_explicit(q, cache)


def test_tolerance_is_tight_enough_to_matter():
    # The derived bound is far below the quantization error itself: the comparison above would
    # catch a wrong head mapping, a missing norm or a missing un-rotation.
    cfg = oscar.OScaRConfig(residual_length=32)
    k, v = make_kv(1, 2, 69, 64, seed=3)
    cache = oscar.quantize_kv(k, v, cfg)
    q = make_q(1, 4, 2, 64)
    _, atol = _check_against_explicit(q, cache)
    k_hat, v_hat = oscar.dequantize_kv(cache)
    ref_quant, _ = explicit_attention(q, k_hat, v_hat)
    ref_fp, _ = explicit_attention(q, k, v)
    assert np.abs(ref_quant - ref_fp).max() > 1e3 * atol
    # and a wrong GQA mapping (h % num_kv_heads instead of h // group) is far outside it
    swapped = q[:, [0, 2, 1, 3]]
    wrong = oscar.decode_attention(swapped, cache)[:, [0, 2, 1, 3]]
    assert np.abs(wrong - ref_quant).max() > 1e3 * atol


@pytest.mark.parametrize("scale", [0.05, 1.0, 3])
def test_custom_scale_and_lse(scale):
    cfg = oscar.OScaRConfig(residual_length=32)
    k, v = make_kv(2, 2, 40, 32, seed=11)
    cache = oscar.quantize_kv(k, v, cfg)
    q = make_q(2, 4, 3, 32, seed=12)
    _check_against_explicit(q, cache, scale=scale)
    # lse really is log sum exp of the scaled logits (and so depends on the scale)
    _, lse = oscar.decode_attention(q, cache, scale=scale, return_lse=True)
    _, lse_default = oscar.decode_attention(q, cache, return_lse=True)
    assert not np.allclose(lse, lse_default)


@pytest.mark.parametrize("t,q_len", [(1, 1), (31, 31), (32, 1), (32, 32), (33, 2), (33, 33),
                                     (64, 5)])
def test_irregular_lengths(t, q_len):
    # seq_len 1 (residual only), R - 1, exactly R (no residual), R + 1, q_len == seq_len
    cfg = oscar.OScaRConfig(residual_length=32)
    k, v = make_kv(1, 1, t, 32, seed=t)
    cache = oscar.quantize_kv(k, v, cfg)
    q = make_q(1, 2, q_len, 32, seed=q_len)
    _check_against_explicit(q, cache)


def test_first_query_sees_only_its_prefix():
    # causal: with q_len == seq_len the first query sees token 0 only, so its output is v[0]
    cfg = oscar.OScaRConfig(residual_length=32)
    k, v = make_kv(1, 2, 40, 32, seed=21)
    cache = oscar.quantize_kv(k, v, cfg)
    q = make_q(1, 2, 40, 32, seed=22)
    out, lse = oscar.decode_attention(q, cache, return_lse=True)
    _, v_hat = oscar.dequantize_kv(cache)
    np.testing.assert_allclose(out[:, :, 0], v_hat[:, :, 0], rtol=1e-5, atol=1e-6)
    # changing a token after position p changes no query at or before p
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 35:] += 1.0
    v2[:, :, 35:] -= 1.0
    out2 = oscar.decode_attention(q, oscar.quantize_kv(k2, v2, cfg))
    assert np.array_equal(out2[:, :, :35], out[:, :, :35])
    assert not np.allclose(out2[:, :, 35:], out[:, :, 35:])


# --- configuration matrix --------------------------------------------------------------------

CONFIGS = [
    *[(f"{name}-int{bits}", dict(kw, key_bits=bits, value_bits=bits, residual_length=32))
      for name, kw in ABLATIONS.items() for bits in (2, 4, 8)],
    ("k4v2", dict(key_bits=4, value_bits=2, residual_length=32)),
    ("k2v4", dict(key_bits=2, value_bits=4, residual_length=32)),
    ("head_scope", dict(norm_scope="head", residual_length=32)),
    ("head_scope_kivi_values", dict(norm_scope="head", rotate_values=False, residual_length=32)),
    ("fp32_params", dict(param_dtype="float32", residual_length=32)),
    ("kg64", dict(key_group_size=64, residual_length=64)),
    ("kg128_r128", dict(key_group_size=128)),
    ("vg16", dict(value_group_size=16, residual_length=32)),
    ("vg64", dict(value_group_size=64, residual_length=32)),
    ("vg8_int4", dict(value_group_size=8, value_bits=4, residual_length=32)),
]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_config_matrix(name, kw):
    cfg = oscar.OScaRConfig(**kw)
    r = cfg.residual_length
    t = r + 3 if r >= 128 else 2 * r + 3
    k, v = make_kv(2, 2, t, 64, seed=len(name))
    cache = oscar.quantize_kv(k, v, cfg)
    assert cache.quantized_len == t // r * r
    arrays = cache.packed().arrays()
    assert ("norms" in arrays) == cfg.scale_tokens
    if cfg.scale_tokens:
        assert arrays["norms"].shape == (2, 1 if cfg.norm_scope == "token" else 2,
                                         cache.quantized_len)
    pd = np.float16 if cfg.param_dtype == "float16" else np.float32
    assert arrays["k_params"].dtype == pd and arrays["v_params"].dtype == pd
    assert arrays["k_params"].shape == (2, 2, cache.quantized_len // cfg.key_group_size, 64, 2)
    assert arrays["v_params"].shape == (2, 2, cache.quantized_len, 64 // cfg.value_group_size, 2)
    q = make_q(2, 4, 2, 64, seed=7)
    _check_against_explicit(q, cache)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_more_bits_less_error(name):
    k, v = make_kv(1, 2, 64, 64, seed=5)
    errs = []
    for bits in (2, 4, 8):
        cfg = oscar.OScaRConfig(key_bits=bits, value_bits=bits, residual_length=64,
                                param_dtype="float32", **ABLATIONS[name])
        k_hat, v_hat = oscar.dequantize_kv(oscar.quantize_kv(k, v, cfg))
        errs.append((np.linalg.norm(k_hat - k) / np.linalg.norm(k),
                     np.linalg.norm(v_hat - v) / np.linalg.norm(v)))
    for (k_lo, v_lo), (k_hi, v_hi) in zip(errs, errs[1:]):
        # each step quadruples or better the number of levels: error drops by > 4x (ideally 5-17x)
        assert k_hi < k_lo / 4 and v_hi < v_lo / 4, errs


# --- input dtypes and containers -------------------------------------------------------------

DTYPES = [("numpy", "float32"), ("numpy", "float16"), ("torch", "float32"), ("torch", "float16"),
          ("torch", "bfloat16")]


def _as(container, dtype, x):
    if container == "numpy":
        return x.astype(dtype)
    return torch.from_numpy(x).to(getattr(torch, dtype))


@pytest.mark.parametrize("container,dtype", DTYPES)
def test_input_dtypes(container, dtype):
    cfg = oscar.OScaRConfig(residual_length=32)
    k, v = make_kv(2, 2, 37, 64, seed=9)
    kc, vc = _as(container, dtype, k), _as(container, dtype, v)
    cache = oscar.quantize_kv(kc, vc, cfg)
    assert cache.dtype == dtype
    k_hat, v_hat = oscar.dequantize_kv(cache)
    assert type(k_hat) is type(kc) and type(v_hat) is type(kc)
    # NumPy has no bfloat16: numpy outputs of bfloat16 caches are float32 (never reached here)
    assert _dtype_name(k_hat) == dtype and _dtype_name(v_hat) == dtype
    # residual tokens come back exactly as given
    assert np.array_equal(to_f64(k_hat)[:, :, 32:], to_f64(kc)[:, :, 32:])
    assert np.array_equal(to_f64(v_hat)[:, :, 32:], to_f64(vc)[:, :, 32:])
    # The float32 twin: a float32 cache of the same (already rounded) values holds the same
    # bytes, and its float32 dequantization is a much sharper oracle than the half-precision one
    # (whose rounding to the cache dtype dominates the derived tolerance).
    twin = oscar.quantize_kv(to_f64(kc).astype(np.float32), to_f64(vc).astype(np.float32), cfg)
    for name, arr in cache.packed().arrays().items():
        assert np.array_equal(arr, twin.packed().arrays()[name]), name
    # the output follows q, whatever the cache holds
    for q_container, q_dtype in [(container, dtype), ("numpy", "float32"), ("torch", "bfloat16")]:
        q = _as(q_container, q_dtype, make_q(2, 4, 2, 64, seed=10))
        _check_against_explicit(q, cache)
        _check_against_explicit(q, cache, oracle_cache=twin)


def test_float16_cache_close_to_float32_cache():
    # a float16 cache quantizes the float16-rounded inputs: close to the float32 cache's result
    cfg = oscar.OScaRConfig(residual_length=32, key_bits=8, value_bits=8)
    k, v = make_kv(1, 2, 64, 32, seed=13)
    out32 = oscar.decode_attention(make_q(1, 2, 1, 32), oscar.quantize_kv(k, v, cfg))
    c16 = oscar.quantize_kv(k.astype(np.float16), v.astype(np.float16), cfg)
    out16 = oscar.decode_attention(make_q(1, 2, 1, 32), c16)
    np.testing.assert_allclose(out16, out32, atol=0.02)
