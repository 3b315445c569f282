"""The edges of the representable range (issue 23, items 2-4): inputs that float16 storage
cannot hold are rejected where they enter, by name, leaving the cache as it was; outputs that
float16 cannot hold are an error, never a silent inf."""

import warnings

import numpy as np
import pytest
import torch

import oscar
from oscar import OScaRConfig

R = 32
CFG = OScaRConfig(residual_length=R)
KIVI = CFG.replace(rotate_keys=False, scale_tokens=False, rotate_values=False)


def _near_limit_keys(seed=0):
    """float16 keys up to the float16 limit: their dequantization exceeds 65504."""
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((1, 2, 2 * R, 32)) * 3e4).clip(-65504, 65504).astype(np.float16)
    return k, (k / 100).astype(np.float16)


# --- item 4: dequantize_kv in float16 -----------------------------------------------------------


@pytest.mark.parametrize("cfg", [CFG, KIVI], ids=["oscar", "kivi"])
@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_dequantize_float16_overflow_raises_and_float32_holds_it(cfg, container):
    k, v = _near_limit_keys()
    if container == "torch":
        k, v = torch.from_numpy(k), torch.from_numpy(v)
    cache = oscar.quantize_kv(k, v, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy overflow warning either
        with pytest.raises(ValueError, match=r"dtype: the dequantized k exceeds the float16 "
                                             r"range .* dtype='float32'"):
            oscar.dequantize_kv(cache)
        k_hat, v_hat = oscar.dequantize_kv(cache, dtype="float32")
    k_hat = np.asarray(k_hat)
    assert k_hat.dtype == np.float32 and np.isfinite(k_hat).all()
    assert np.abs(k_hat).max() > 65504  # the values a float16 output could not hold
    assert (k_hat[:, :, cache.quantized_len:] == np.asarray(k[:, :, cache.quantized_len:],
                                                             np.float32)).all()


def test_dequantize_dtype_argument():
    k, v = _near_limit_keys()
    cache = oscar.quantize_kv(k[..., :R + 3, :] / 4, v[..., :R + 3, :], CFG)
    assert oscar.dequantize_kv(cache)[0].dtype == np.float16
    assert oscar.dequantize_kv(cache, dtype="float32")[0].dtype == np.float32
    with pytest.raises(ValueError, match=r"dtype: expected one of .* or None, got 'float64'"):
        oscar.dequantize_kv(cache, dtype="float64")


# --- item 3: float16 params underflow -------------------------------------------------------------

from oscar.reference import quantize_groups, dequantize_groups  # noqa: E402
from oscar.reference.quantize import FLOAT16_TINY  # noqa: E402

TINY = np.float32(FLOAT16_TINY)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_rejects_groups_below_float16_normal_range(bits):
    below = np.nextafter(TINY, np.float32(0))
    groups = [
        np.linspace(0, 1e-6, 32, dtype=np.float32),                 # all tiny, not constant
        np.where(np.arange(32) % 2, -below, below).astype(np.float32),  # just below, both signs
    ]
    for x in groups:
        with pytest.raises(ValueError, match=r"^x: a quantization group is not constant but all "
                                             r"its values are below 6.1e-05 .*float32"):
            quantize_groups(x, bits, "float16")
        codes, params = quantize_groups(x, bits, "float32")  # float32 holds it
        err = np.abs(dequantize_groups(codes, params) - x).max()
        assert err <= (x.max() - x.min()) / (2**bits - 1) / 2 * (1 + 1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_accepts_what_float16_holds(bits):
    accepted = [
        np.full(32, 1e-7, np.float32),                   # constant tiny group: exact codes 0
        np.zeros(32, np.float32),
        np.linspace(0, TINY, 32, dtype=np.float32),     # reaches the smallest normal
        np.float32(0.5) + np.linspace(0, 1e-8, 32, dtype=np.float32),  # tiny range, normal size
    ]
    for x in accepted:
        codes, params = quantize_groups(x, bits, "float16")
        assert np.isfinite(params.astype(np.float32)).all()


def test_issue_examples_tiny_values_and_keys():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 2, 2 * R, 32)).astype(np.float32)
    v = rng.standard_normal((1, 2, 2 * R, 32)).astype(np.float32)
    int8 = CFG.replace(key_bits=8, value_bits=8)
    # values scaled by 1e-6: float16 params would give a relative error of 2.3 -> an error
    with pytest.raises(ValueError, match=r"^v: .*not constant .*param_dtype='float32'"):
        oscar.quantize_kv(k, v * 1e-6, int8)
    cache = oscar.quantize_kv(k, v * 1e-6, int8.replace(param_dtype="float32"))
    v_hat = oscar.dequantize_kv(cache)[1][:, :, :R]
    assert np.linalg.norm(v_hat - v[:, :, :R] * 1e-6) / np.linalg.norm(v[:, :, :R] * 1e-6) < 0.01
    # keys scaled by 1e-30: the squares underflow, the norm is replaced by 1 and the tiny scaled
    # keys cannot be held by float16 params -> an error, never a silent cache of zeros
    with pytest.raises(ValueError, match=r"^k: .*not constant"):
        oscar.quantize_kv(k * 1e-30, v, CFG)
    cache = oscar.quantize_kv(k * 1e-30, v, CFG.replace(param_dtype="float32"))
    k_hat = oscar.dequantize_kv(cache)[0][:, :, :R].astype(np.float64) * 1e30
    assert np.linalg.norm(k_hat - k[:, :, :R]) / np.linalg.norm(k[:, :, :R]) < 0.5


# --- item 2: a token that cannot be quantized is rejected by the append that brings it ---------


def _snapshot(cache):
    k_res, v_res = cache.residual()
    return (cache.seq_len, cache.quantized_len, np.array(k_res), np.array(v_res),
            {n: a.copy() for n, a in cache.packed().arrays().items()})


def _assert_unchanged(cache, snap):
    now = _snapshot(cache)
    assert now[:2] == snap[:2]
    assert np.array_equal(now[2], snap[2]) and np.array_equal(now[3], snap[3])
    assert now[4].keys() == snap[4].keys()
    for name in now[4]:
        assert np.array_equal(now[4][name], snap[4][name]), name


def _big_token(which, cfg):
    """One token whose (rotated) values exceed float16 once quantized, and a good one."""
    rng = np.random.default_rng(1)
    k = rng.standard_normal((1, 2, 1, 32)).astype(np.float32)
    v = rng.standard_normal((1, 2, 1, 32)).astype(np.float32)
    bad_k, bad_v = k.copy(), v.copy()
    if which == "v":
        bad_v[0, 1, 0, :] = 2e4  # rotation puts 2e4 * sqrt(32) ~ 1.1e5 on channel 0
    else:
        bad_k[0, 0, 0, 3] = 1e5  # KIVI keys: the raw value is the quantizer's input
    return (k, v), (bad_k, bad_v)


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("fill", [0, 5, R - 1])
def test_append_rejects_unquantizable_residual_token(which, fill):
    cfg = KIVI if which == "k" else CFG
    rng = np.random.default_rng(fill)
    k0 = rng.standard_normal((1, 2, R + fill, 32)).astype(np.float32)
    cache = oscar.quantize_kv(k0, k0.copy(), cfg)
    (k, v), (bad_k, bad_v) = _big_token(which, cfg)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match=rf"^{which}_new: .*outside the float16 range"):
        cache.append(bad_k, bad_v)
    _assert_unchanged(cache, snap)
    # the cache still grows, through any number of flushes
    for _ in range(2 * R):
        cache.append(k, v)
    assert cache.seq_len == R + fill + 2 * R
    cache.check()


@pytest.mark.parametrize("which", ["k", "v"])
def test_quantize_kv_rejects_unquantizable_residual_token(which):
    """The same token in quantize_kv's residual part: an error naming k or v, not a later one."""
    cfg = KIVI if which == "k" else CFG
    rng = np.random.default_rng(3)
    k0 = rng.standard_normal((1, 2, R + 3, 32)).astype(np.float32)
    _, (bad_k, bad_v) = _big_token(which, cfg)
    k = np.concatenate((k0, bad_k), axis=2)
    v = np.concatenate((k0, bad_v), axis=2)
    with pytest.raises(ValueError, match=rf"^{which}: .*outside the float16 range"):
        oscar.quantize_kv(k, v, cfg)
    # float32 params hold it
    assert oscar.quantize_kv(k, v, cfg.replace(param_dtype="float32")).seq_len == R + 4


def test_flushing_append_names_k_new():
    cache = oscar.quantize_kv(*[np.ones((1, 2, R - 1, 32), np.float32)] * 2, CFG)
    _, (bad_k, bad_v) = _big_token("v", CFG)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match=r"^v_new: .*outside the float16 range"):
        cache.append(bad_k, bad_v)  # completes the window: the flush itself rejects it
    _assert_unchanged(cache, snap)


def test_key_group_underflow_rejected_by_the_append_that_completes_the_group():
    """A key group's underflow is known when its last token arrives: that append is rejected
    (the cache as it was), earlier ones are not, and other tokens can still complete it."""
    cfg = KIVI.replace(residual_length=2 * R)
    tiny = np.full((1, 2, 1, 32), 1e-6, np.float32)
    cache = oscar.QuantizedKVCache.empty(1, 2, 32, "float32", cfg)
    for i in range(R - 1):
        cache.append(tiny * (1 + i / R), np.ones_like(tiny))  # group 0 not complete: accepted
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match=r"^k_new: a quantization group is not constant"):
        cache.append(tiny * 2, np.ones_like(tiny))
    _assert_unchanged(cache, snap)
    cache.append(np.ones_like(tiny), np.ones_like(tiny))  # a normal token completes the group
    for _ in range(R):
        cache.append(np.ones_like(tiny), np.ones_like(tiny))
    assert cache.quantized_len == 2 * R and cache.residual_len == 0
