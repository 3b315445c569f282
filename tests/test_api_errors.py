"""Every invalid input or configuration raises ValueError/TypeError naming the argument.

Messages follow ``"<argument>: expected <what>, got <what>"`` (oscar/_validate.py); each case
matches the argument's name and, where it helps, the gist of what was expected.
"""

import math

import numpy as np
import pytest
import torch

import oscar
from oscar import OScaRConfig, QuantizedKVCache

from helpers_reference import make_kv, make_q

R = 32
CFG = OScaRConfig(residual_length=R)


def _kv(t=R + 3, b=2, h=2, d=32, dtype=np.float32):
    return make_kv(b, h, t, d, seed=t, dtype=dtype)


def _cache(t=R + 3, **kw):
    k, v = _kv(t, **kw)
    return oscar.quantize_kv(k, v, CFG)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(key_bits=3), ValueError, r"key_bits must be one of \(2, 4, 8\), got 3"),
    (dict(value_bits=1), ValueError, r"value_bits must be one of"),
    (dict(value_bits=16), ValueError, r"value_bits"),
    (dict(key_bits=True), TypeError, r"key_bits must be an int, got bool"),
    (dict(key_bits="2"), TypeError, r"key_bits must be an int, got str"),
    (dict(value_bits=2.0), TypeError, r"value_bits must be an int, got float"),
    (dict(key_group_size=16), ValueError, r"key_group_size must be one of \(32, 64, 128\)"),
    (dict(key_group_size=np.int64(16)), ValueError, r"key_group_size must be one of"),
    (dict(key_bits=np.bool_(True)), TypeError, r"key_bits must be an int, got bool"),
    (dict(rotate_keys=np.int64(1)), TypeError, r"rotate_keys must be a bool \(True or False\)"),
    (dict(value_group_size=48), ValueError, r"value_group_size must be a power of two"),
    (dict(value_group_size=512), ValueError, r"value_group_size"),
    (dict(value_group_size=0), ValueError, r"value_group_size"),
    (dict(value_group_size=8), ValueError, r"value_group_size must be at least 16"),
    (dict(value_group_size=4, value_bits=4), ValueError, r"value_group_size must be at least 8"),
    (dict(value_group_size=False), TypeError, r"value_group_size must be an int"),
    (dict(residual_length=0), ValueError, r"residual_length must be a positive multiple"),
    (dict(residual_length=-32), ValueError, r"residual_length"),
    (dict(residual_length=48), ValueError, r"residual_length must be a positive multiple of "
                                           r"key_group_size \(32\), got 48"),
    (dict(residual_length=64, key_group_size=128), ValueError, r"residual_length"),
    (dict(residual_length=True), TypeError, r"residual_length must be an int"),
    (dict(residual_length="128"), TypeError, r"residual_length must be an int"),
    (dict(rotate_keys=1), TypeError, r"rotate_keys must be a bool \(True or False\), got int"),
    (dict(scale_tokens="yes"), TypeError, r"scale_tokens must be a bool"),
    (dict(rotate_values=None), TypeError, r"rotate_values must be a bool"),
    (dict(norm_scope="channel"), ValueError, r"norm_scope must be one of"),
    (dict(norm_scope=None), ValueError, r"norm_scope"),
    (dict(param_dtype="bfloat16"), ValueError, r"param_dtype must be one of"),
    (dict(param_dtype=np.float16), ValueError, r"param_dtype"),
])
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        OScaRConfig(**kwargs)


def test_config_accepts_numpy_ints_and_bools():
    """NumPy integers and bools (e.g. from a sweep over np.arange or a mask) are normalized to
    Python int/bool, so the config equals, hashes and serializes like one built from literals."""
    cfg = OScaRConfig(key_bits=np.int64(4), value_bits=np.uint8(2), key_group_size=np.int32(64),
                      value_group_size=np.int16(32), residual_length=np.int64(128),
                      rotate_keys=np.False_, scale_tokens=np.bool_(True), rotate_values=np.True_)
    ref = OScaRConfig(key_bits=4, key_group_size=64, rotate_keys=False)
    assert cfg == ref and hash(cfg) == hash(ref)
    for name in ("key_bits", "value_bits", "key_group_size", "value_group_size",
                 "residual_length"):
        assert type(getattr(cfg, name)) is int
    for name in ("rotate_keys", "scale_tokens", "rotate_values"):
        assert type(getattr(cfg, name)) is bool
    assert type(CFG.replace(key_bits=np.int8(4)).key_bits) is int


def test_config_replace_validates_and_is_frozen():
    with pytest.raises(ValueError, match="key_bits"):
        CFG.replace(key_bits=5)
    with pytest.raises(AttributeError):
        CFG.key_bits = 4  # frozen dataclass


@pytest.mark.parametrize("config", ["default", {"key_bits": 2}, None.__class__, 0])
def test_config_not_an_oscar_config(config):
    k, v = _kv()
    with pytest.raises(TypeError, match=r"config: expected OScaRConfig"):
        oscar.quantize_kv(k, v, config)
    with pytest.raises(TypeError, match=r"config: expected OScaRConfig"):
        QuantizedKVCache.empty(2, 2, 32, "float32", config)


@pytest.mark.parametrize("d,match", [
    (48, r"head_dim must be a power of two from 32 to 256, got 48"),
    (16, r"head_dim must be a power of two from 32 to 256, got 16"),
    (512, r"head_dim must be a power of two from 32 to 256, got 512"),
    (96, r"head_dim"),
])
def test_head_dim_out_of_range(d, match):
    k, v = make_kv(1, 1, 4, d)
    with pytest.raises(ValueError, match=match):
        oscar.quantize_kv(k, v, CFG)
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache.empty(1, 1, d, "float32", CFG)


def test_value_group_not_dividing_head_dim():
    k, v = make_kv(1, 1, 4, 32)
    with pytest.raises(ValueError, match=r"value_group_size \(64\) must divide head_dim \(32\)"):
        oscar.quantize_kv(k, v, CFG.replace(value_group_size=64))


# --- k and v ---------------------------------------------------------------------------------


def test_wrong_rank():
    k, v = _kv()
    with pytest.raises(ValueError, match=r"k: expected a 4-D array \[batch, num_kv_heads, "
                                         r"seq_len, head_dim\], got shape \(2, 35, 32\)"):
        oscar.quantize_kv(k[0], v, CFG)
    with pytest.raises(ValueError, match=r"v: expected a 4-D array"):
        oscar.quantize_kv(k, v[None], CFG)
    with pytest.raises(ValueError, match=r"k: expected a 4-D array .*got shape \(\)"):
        oscar.quantize_kv(np.zeros((), np.float32), v, CFG)


@pytest.mark.parametrize("shape", [(0, 2, 4, 32), (2, 0, 4, 32)])
def test_empty_batch_or_heads(shape):
    k = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"k: expected non-empty dimensions"):
        oscar.quantize_kv(k, k, CFG)


def test_not_an_array():
    k, v = _kv()
    with pytest.raises(TypeError, match=r"k: expected a numpy.ndarray or torch.Tensor, got list"):
        oscar.quantize_kv(k.tolist(), v, CFG)
    with pytest.raises(TypeError, match=r"v: expected a numpy.ndarray or torch.Tensor"):
        oscar.quantize_kv(k, None, CFG)
    with pytest.raises(TypeError, match=r"k: expected a numpy.ndarray or torch.Tensor, got "
                                        r"float32"):
        oscar.quantize_kv(np.float32(1.0), v, CFG)


def test_shape_mismatch():
    k, v = _kv()
    with pytest.raises(ValueError, match=r"v: expected the shape of k \(2, 2, 35, 32\), "
                                         r"got \(2, 2, 34, 32\)"):
        oscar.quantize_kv(k, v[:, :, :-1], CFG)
    with pytest.raises(ValueError, match=r"v: expected the shape of k"):
        oscar.quantize_kv(k, v[:, :1], CFG)


def test_dtype_mismatch():
    k, v = _kv()
    with pytest.raises(TypeError, match=r"v: expected the dtype of k \(float32\), got float16"):
        oscar.quantize_kv(k, v.astype(np.float16), CFG)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_, np.complex64])
def test_integer_and_other_dtypes(dtype):
    k = np.ones((1, 1, 4, 32), dtype)
    with pytest.raises(TypeError, match=r"k: expected dtype in \('float16', 'bfloat16', "
                                        r"'float32'\), got " + np.dtype(dtype).name):
        oscar.quantize_kv(k, k, CFG)


def test_float64_arrays():
    k, v = _kv()
    with pytest.raises(TypeError, match=r"k: expected dtype in .*got float64 \(convert with "
                                        r"\.astype\(np\.float32\)\)"):
        oscar.quantize_kv(k.astype(np.float64), v.astype(np.float64), CFG)
    with pytest.raises(TypeError, match=r"k: .*got float64"):
        oscar.quantize_kv(torch.from_numpy(k).double(), torch.from_numpy(v).double(), CFG)
    with pytest.raises(TypeError, match=r"k: .*got int64"):
        oscar.quantize_kv(torch.ones(1, 1, 4, 32, dtype=torch.int64),
                          torch.ones(1, 1, 4, 32, dtype=torch.int64), CFG)


def test_numpy_and_torch_mixed():
    k, v = _kv()
    with pytest.raises(ValueError, match=r"v: expected the device of k"):
        oscar.quantize_kv(k, torch.from_numpy(v), CFG)


@pytest.mark.parametrize("first", ["numpy", "torch"])
@pytest.mark.parametrize("t", [0, 5, R + 3])
def test_append_keeps_the_cache_container(first, t):
    """A host cache keeps the container of its first tokens: appending the other one is a
    TypeError that leaves the cache as it was (dequantize_kv's output type never changes)."""
    k, v = _kv(t) if t else _kv(1)
    k, v = (k[:, :, :t], v[:, :, :t])
    kn, vn = _kv(3)
    as_torch = lambda *xs: [torch.from_numpy(np.ascontiguousarray(x)) for x in xs]
    if first == "torch":
        k, v = as_torch(k, v)
        other, same, want = (kn, vn), as_torch(kn, vn), "torch.Tensor"
    else:
        other, same, want = as_torch(kn, vn), (kn, vn), "numpy.ndarray"
    cache = oscar.quantize_kv(k, v, CFG)
    with pytest.raises(TypeError, match=rf"k_new: expected a {want} \(the cache was built from "
                                        rf"{first} inputs\), got "):
        cache.append(*other)
    assert cache.seq_len == t
    cache.append(*same)
    k_hat, _ = oscar.dequantize_kv(cache)
    assert isinstance(k_hat, torch.Tensor) == (first == "torch")


def test_empty_cache_takes_the_container_of_its_first_append():
    cache = oscar.QuantizedKVCache.empty(2, 2, 32, "float32", CFG)
    k, v = _kv(3)
    cache.append(torch.from_numpy(k), torch.from_numpy(v))
    with pytest.raises(TypeError, match=r"k_new: expected a torch.Tensor"):
        cache.append(k, v)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("t", [5, R + 3])  # residual only, and quantized part
def test_non_finite_k_v(bad, which, t):
    k, v = _kv(t)
    target = k if which == "k" else v
    target[1, 0, 3, 7] = bad
    with pytest.raises(ValueError, match=rf"{which}: expected finite values, got .* at index "
                                         r"\(1, 0, 3, 7\) \(1 non-finite elements\)"):
        oscar.quantize_kv(k, v, CFG)


def test_float16_input_overflowing_to_inf():
    # 1e5 does not fit a float16 input: it is inf before oscar sees it
    k, v = _kv(dtype=np.float16)
    with np.errstate(over="ignore"):
        v[0, 0, 0, 0] = 1e5
    with pytest.raises(ValueError, match=r"v: expected finite values"):
        oscar.quantize_kv(k, v, CFG)


def test_float16_param_overflow_values():
    # |v| = 1e5 cannot be stored as a float16 (scale, min): a clear error naming v
    k, v = _kv()
    v[0, 1, 2, :] = 1e5
    with pytest.raises(ValueError, match=r"^v: .*outside the float16 range.*param_dtype='float32'"):
        oscar.quantize_kv(k, v, CFG)
    # float32 params hold it
    cache = oscar.quantize_kv(k, v, CFG.replace(param_dtype="float32"))
    assert np.isfinite(oscar.dequantize_kv(cache)[1]).all()


def test_float16_param_overflow_after_rotation():
    # 2e4 < 65504 everywhere, but the Hadamard rotation of a constant token puts
    # 2e4 * sqrt(32) ~ 1.1e5 on channel 0: the rotated value overflows float16, the raw one not.
    k, v = _kv()
    v[0, 0, 0, :] = 2e4
    with pytest.raises(ValueError, match=r"^v: .*float16"):
        oscar.quantize_kv(k, v, CFG)
    cache = oscar.quantize_kv(k, v, CFG.replace(rotate_values=False))
    assert cache.quantized_len == R


def test_float16_param_overflow_keys():
    kivi = CFG.replace(rotate_keys=False, scale_tokens=False, rotate_values=False)
    rotation_only = CFG.replace(scale_tokens=False)
    # one large element: rotation spreads it (1e5 / sqrt(32) ~ 1.8e4 per channel), scaled keys
    # have unit norm; only the unrotated, unscaled key overflows
    k, v = _kv()
    k[1, 1, 5, 3] = -1e5
    assert oscar.quantize_kv(k, v, CFG).quantized_len == R
    assert oscar.quantize_kv(k, v, rotation_only).quantized_len == R
    with pytest.raises(ValueError, match=r"^k: .*float16"):
        oscar.quantize_kv(k, v, kivi)
    # one large constant token: rotation concentrates it (2e4 * sqrt(32) ~ 1.1e5 on channel 0)
    k, v = _kv()
    k[0, 0, 7, :] = 2e4
    assert oscar.quantize_kv(k, v, kivi).quantized_len == R
    assert oscar.quantize_kv(k, v, CFG).quantized_len == R
    with pytest.raises(ValueError, match=r"^k: .*float16"):
        oscar.quantize_kv(k, v, rotation_only)


# --- backend -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cuda", "Reference", "", 0])
def test_bad_backend_name(backend):
    k, v = _kv()
    with pytest.raises(ValueError, match=r"backend: expected one of \('reference', 'numba'\) "
                                         r"or None"):
        oscar.quantize_kv(k, v, CFG, backend=backend)


def test_numba_backend_with_host_inputs():
    k, v = _kv()
    with pytest.raises(ValueError, match=r"k: backend='numba' needs CUDA torch tensors, got "
                                         r"ndarray"):
        oscar.quantize_kv(k, v, CFG, backend="numba")
    with pytest.raises(ValueError, match=r"k: backend='numba' needs CUDA torch tensors, got "
                                         r"Tensor on cpu"):
        oscar.quantize_kv(torch.from_numpy(k), torch.from_numpy(v), CFG, backend="numba")


def test_reference_backend_explicit_is_fine():
    k, v = _kv()
    assert oscar.quantize_kv(k, v, CFG, backend="reference").backend == "reference"


@pytest.mark.parametrize("value", [-1, True, 2.5, "128"])
def test_bad_max_seq_len(value):
    k, v = _kv()
    with pytest.raises(ValueError, match=r"max_seq_len: expected a non-negative int or None"):
        oscar.quantize_kv(k, v, CFG, max_seq_len=value)


# --- QuantizedKVCache.empty / append -----------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(batch=0), ValueError, r"batch: expected a positive int, got 0"),
    (dict(batch=True), ValueError, r"batch: expected a positive int, got True"),
    (dict(batch=2.0), ValueError, r"batch: expected a positive int"),
    (dict(num_kv_heads=-1), ValueError, r"num_kv_heads: expected a positive int"),
    (dict(head_dim=33), ValueError, r"head_dim must be a power of two"),
    (dict(dtype="int8"), TypeError, r"dtype: expected one of"),
    (dict(dtype=np.float32), TypeError, r"dtype: expected one of"),
    (dict(backend="numba"), ValueError, r"device: expected a CUDA device"),
    (dict(backend="gpu"), ValueError, r"backend: expected 'reference' or 'numba'"),
    (dict(device="cuda"), ValueError, r"device: expected None or 'cpu'"),
])
def test_bad_empty_cache(kwargs, exc, match):
    args = dict(batch=1, num_kv_heads=2, head_dim=32, dtype="float32", config=CFG)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        QuantizedKVCache.empty(**args)


def test_reserve_bad_seq_len():
    with pytest.raises(ValueError, match=r"seq_len: expected a non-negative int"):
        _cache().reserve(-1)


@pytest.mark.parametrize("shape,match", [
    ((1, 2, 3, 32), r"k_new: expected shape \[batch, num_kv_heads, n >= 1, head_dim\] = "
                    r"\[2, 2, n, 32\], got \(1, 2, 3, 32\)"),
    ((2, 1, 3, 32), r"k_new: expected shape"),
    ((2, 2, 3, 64), r"k_new: expected shape"),
    ((2, 2, 0, 32), r"k_new: expected shape .*n >= 1"),
])
def test_append_mismatched_shape(shape, match):
    cache = _cache()
    k = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=match):
        cache.append(k, k)
    assert cache.seq_len == R + 3


def test_append_mismatched_dtype_and_pair():
    cache = _cache()
    k, v = _kv(t=2)
    with pytest.raises(TypeError, match=r"k_new: expected dtype float32 \(the cache's\), got "
                                        r"float16"):
        cache.append(k.astype(np.float16), v.astype(np.float16))
    with pytest.raises(TypeError, match=r"v_new: expected the dtype of k_new"):
        cache.append(k, v.astype(np.float16))
    with pytest.raises(ValueError, match=r"v_new: expected the shape of k_new"):
        cache.append(k, v[:, :, :1])
    with pytest.raises(ValueError, match=r"k_new: expected a 4-D array"):
        cache.append(k[0], v[0])
    with pytest.raises(TypeError, match=r"k_new: expected dtype in .*got float64"):
        cache.append(k.astype(np.float64), v.astype(np.float64))
    bf16 = torch.from_numpy(k).bfloat16()
    with pytest.raises(TypeError, match=r"k_new: expected dtype float32 .*got bfloat16"):
        cache.append(bf16, bf16)
    k[0, 0, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^k_new: expected finite values"):
        cache.append(k, v)
    assert cache.seq_len == R + 3


def test_checks_still_run_after_a_valid_torch_call():
    """append and decode_attention skip their static checks for torch inputs of a kind that
    passed them on the same cache (same type, shape, dtype, device, batch): every other kind is
    still checked, after any number of valid calls, and a batch change re-checks."""
    k, v = (torch.from_numpy(x) for x in _kv(R + 3))
    cache = oscar.quantize_kv(k, v, CFG)
    one_k, one_v = k[:, :, :1].clone(), v[:, :, :1].clone()
    q = torch.from_numpy(make_q(2, 4, 1, 32))
    for _ in range(3):
        cache.append(one_k, one_v)
        oscar.decode_attention(q, cache)
    n = cache.seq_len
    with pytest.raises(TypeError, match=r"k_new: expected dtype float32 \(the cache's\), got "
                                        r"bfloat16"):
        cache.append(one_k.bfloat16(), one_v.bfloat16())
    with pytest.raises(ValueError, match=r"v_new: expected the shape of k_new"):
        cache.append(one_k, v[:, :, :2])
    with pytest.raises(ValueError, match=r"k_new: expected shape"):
        cache.append(one_k[:1], one_v[:1])
    with pytest.raises(ValueError, match=r"k_new: expected finite values"):  # values: always
        cache.append(torch.full_like(one_k, float("nan")), one_v)
    with pytest.raises(ValueError, match=r"q: num_q_heads \(3\) must be a multiple"):
        oscar.decode_attention(q[:, :3], cache)
    with pytest.raises(TypeError, match=r"q: expected dtype in .*got float64"):
        oscar.decode_attention(q.double(), cache)
    with pytest.raises(ValueError, match=r"q: expected 1 <= q_len"):  # lengths: always
        oscar.decode_attention(torch.zeros(2, 4, n + 1, 32), cache)
    assert cache.seq_len == n
    cache.select_batch([1])  # batch 2 -> 1: the kinds checked for batch 2 are checked again
    with pytest.raises(ValueError, match=r"k_new: expected shape \[batch, num_kv_heads, n >= 1, "
                                         r"head_dim\] = \[1, 2, n, 32\]"):
        cache.append(one_k, one_v)
    with pytest.raises(ValueError, match=r"q: expected shape \[1, num_q_heads"):
        oscar.decode_attention(q, cache)
    cache.append(one_k[1:], one_v[1:])
    assert oscar.decode_attention(q[1:], cache).shape == (1, 4, 1, 32)


# --- queries, decode_attention, dequantize_kv --------------------------------------------------


def test_query_wrong_rank_dtype_and_container():
    cache = _cache()
    q = make_q(2, 4, 1, 32)
    with pytest.raises(ValueError, match=r"q: expected a 4-D array \[batch, num_q_heads, q_len, "
                                         r"head_dim\]"):
        oscar.decode_attention(q[:, :, 0], cache)
    with pytest.raises(TypeError, match=r"q: expected dtype in .*got float64"):
        oscar.decode_attention(q.astype(np.float64), cache)
    with pytest.raises(TypeError, match=r"q: expected dtype in .*got int32"):
        oscar.decode_attention(q.astype(np.int32), cache)
    with pytest.raises(TypeError, match=r"q: expected a numpy.ndarray or torch.Tensor"):
        oscar.decode_attention(q.tolist(), cache)


def test_query_shape_against_cache():
    cache = _cache()
    with pytest.raises(ValueError, match=r"q: expected shape \[2, num_q_heads, q_len, 32\] to "
                                         r"match the cache, got \(3, 4, 1, 32\)"):
        oscar.decode_attention(make_q(3, 4, 1, 32), cache)
    with pytest.raises(ValueError, match=r"q: expected shape \[2, num_q_heads, q_len, 32\]"):
        oscar.decode_attention(make_q(2, 4, 1, 64), cache)


@pytest.mark.parametrize("num_q_heads", [1, 3, 5])
def test_num_q_heads_not_a_multiple(num_q_heads):
    cache = _cache()  # 2 KV heads
    with pytest.raises(ValueError, match=rf"q: num_q_heads \({num_q_heads}\) must be a multiple "
                                         r"of the cache's num_kv_heads \(2\)"):
        oscar.decode_attention(make_q(2, num_q_heads, 1, 32), cache)


def test_q_len_longer_than_cache():
    cache = _cache(t=5)
    with pytest.raises(ValueError, match=r"q: expected 1 <= q_len <= cache.seq_len \(5\).*"
                                         r"q_len=6"):
        oscar.decode_attention(make_q(2, 2, 6, 32), cache)
    oscar.decode_attention(make_q(2, 2, 5, 32), cache)  # the whole cache is fine


def test_empty_cache():
    cache = QuantizedKVCache.empty(2, 2, 32, "float32", CFG)
    with pytest.raises(ValueError, match=r"cache: expected at least one token, got an empty"):
        oscar.decode_attention(make_q(2, 2, 1, 32), cache)
    k, v = oscar.dequantize_kv(cache)  # dequantizing an empty cache is fine: zero tokens
    assert k.shape == v.shape == (2, 2, 0, 32)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_q(bad):
    cache = _cache()
    q = make_q(2, 2, 1, 32)
    q[1, 1, 0, 31] = bad
    with pytest.raises(ValueError, match=r"q: expected finite values, got .* at index "
                                         r"\(1, 1, 0, 31\)"):
        oscar.decode_attention(q, cache)


@pytest.mark.parametrize("scale,exc", [
    (0.0, ValueError), (-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
    (np.float32(-1), ValueError), ("0.1", TypeError), (True, TypeError), ([0.1], TypeError),
])
def test_bad_scale(scale, exc):
    cache = _cache()
    with pytest.raises(exc, match=r"scale: expected a (positive finite float|float or None)"):
        oscar.decode_attention(make_q(2, 2, 1, 32), cache, scale=scale)


@pytest.mark.parametrize("scale", [1, 0.5, np.float32(0.25), np.float64(2.0)])
def test_good_scales(scale):
    out = oscar.decode_attention(make_q(2, 2, 1, 32), _cache(), scale=scale)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("value", [1, "yes", None])
def test_bad_return_lse(value):
    with pytest.raises(TypeError, match=r"return_lse: expected a bool"):
        oscar.decode_attention(make_q(2, 2, 1, 32), _cache(), return_lse=value)


@pytest.mark.parametrize("cache", [None, "cache", (np.zeros(1), np.zeros(1))])
def test_not_a_cache(cache):
    with pytest.raises(TypeError, match=r"cache: expected QuantizedKVCache, got"):
        oscar.decode_attention(make_q(2, 2, 1, 32), cache)
    with pytest.raises(TypeError, match=r"cache: expected QuantizedKVCache, got"):
        oscar.dequantize_kv(cache)
