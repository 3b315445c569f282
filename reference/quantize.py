"""The asymmetric min/max quantizer of SPEC section 3, one rule for keys and values.

For one group x (float32), L = 2**bits - 1:

    mn = min(x); mx = max(x); scale = (mx - mn) / L                 float32
    scale_s, mn_s = storage(scale), storage(mn)                     round to nearest even
    c = clamp(rint((x - mn_s) / scale_s), 0, L)                     float32 true division,
                                                                     rint = half to even;
                                                                     scale_s == 0 -> c = 0
    x_hat = mn_s + c * scale_s                                      float32 (one mul, one add)

Keys are grouped per channel over ``key_group_size`` consecutive tokens, values per token over
``value_group_size`` consecutive channels. (scale, min) pairs are stored with a trailing axis of
2: ``params[..., 0] = scale``, ``params[..., 1] = min`` (docs/format.md).
"""

from __future__ import annotations

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger magnitudes round to inf
#: The smallest normal float16, 2**-14 (6.1e-5). Below it float16 keeps an absolute precision
#: of 2**-25 instead of a relative one: a group whose values all lie below it in magnitude gets a
#: subnormal (or zero) scale and min, and its reconstruction error can exceed the values
#: themselves (values of 1e-6 at INT8: relative error 2.3). Such a group, unless constant, is an
#: error with float16 params (the kernels flag it the same way).
FLOAT16_TINY = float(np.finfo(np.float16).tiny)


def _storage_dtype(param_dtype: str):
    return np.float16 if param_dtype == "float16" else np.float32


def quantize_groups(x: np.ndarray, bits: int, param_dtype: str = "float16", name: str = "x"):
    """Quantize ``x[..., group]`` (groups along the last axis).

    Returns ``(codes uint8 [..., group], params [..., 2])`` with params in the storage dtype.
    Raises ValueError (naming ``name``) when the storage cannot hold a group's min, max or
    scale (:func:`check_storable`: non-finite; float16 overflow or underflow).
    """
    x = np.asarray(x, dtype=np.float32)
    levels = np.float32((1 << bits) - 1)
    # + 0.0 turns -0.0 into +0.0: NumPy's SIMD min/max may return either zero, and the stored
    # min's sign bit must be defined (the kernels store +0.0).
    mn = x.min(axis=-1) + np.float32(0.0)
    mx = x.max(axis=-1) + np.float32(0.0)
    scale = (mx - mn) / levels
    store = _storage_dtype(param_dtype)
    check_storable(mn, mx, scale, param_dtype, name)
    scale_s = scale.astype(store)
    mn_s = mn.astype(store)
    s32 = scale_s.astype(np.float32)[..., None]
    m32 = mn_s.astype(np.float32)[..., None]
    q = np.divide(x - m32, s32, out=np.zeros_like(x), where=s32 != 0)
    codes = np.clip(np.rint(q), 0, levels).astype(np.uint8)
    params = np.stack((scale_s, mn_s), axis=-1)
    return codes, params


def check_storable(mn, mx, scale, param_dtype: str, name: str) -> None:
    """Raise ValueError (naming ``name``) unless the storage dtype holds every group's pair.

    ``mn``, ``mx``, ``scale``: float32 per group (the quantizer's step 1). Errors: a non-finite
    extreme; with float16 storage, an extreme or scale beyond 65504 (overflow), or a group that
    is not constant and lies entirely below FLOAT16_TINY in magnitude (underflow).
    """
    if not (np.isfinite(mn).all() and np.isfinite(mx).all()):
        raise ValueError(f"{name}: expected finite values in every quantization group, got "
                         "NaN or Inf")
    if param_dtype != "float16":
        return
    mag = np.maximum(np.abs(mn), np.abs(mx))
    worst = mag.max(initial=0.0)
    if not worst <= FLOAT16_MAX or not np.abs(scale).max(initial=0.0) <= FLOAT16_MAX:
        raise ValueError(
            f"{name}: a quantization group has min/max/scale of magnitude up to {worst:.6g}, "
            f"outside the float16 range (|x| <= {FLOAT16_MAX:g}) of param_dtype='float16'; "
            "use param_dtype='float32' or rescale the input"
        )
    tiny = (mx > mn) & (mag < np.float32(FLOAT16_TINY))
    if tiny.any():
        raise ValueError(
            f"{name}: a quantization group is not constant but all its values are below "
            f"{FLOAT16_TINY:.3g} in magnitude (largest {float(mag[tiny].max()):.3g}), where "
            "param_dtype='float16' stores its scale and min as subnormals or zeros and loses "
            "the group; use param_dtype='float32' or rescale the input"
        )


def dequantize_groups(codes: np.ndarray, params: np.ndarray) -> np.ndarray:
    """``x_hat = min + code * scale`` in float32, for codes ``[..., group]``, params ``[..., 2]``."""
    scale = params[..., 0].astype(np.float32)[..., None]
    mn = params[..., 1].astype(np.float32)[..., None]
    return (mn + codes.astype(np.float32) * scale).astype(np.float32)


def quantize_keys(u: np.ndarray, bits: int, group_size: int, param_dtype: str = "float16",
                  name: str = "k"):
    """Per-channel key quantization of ``u[batch, heads, tokens, head_dim]`` (tokens % group == 0).

    Returns codes ``uint8 [batch, heads, tokens, head_dim]`` and params
    ``[batch, heads, tokens // group_size, head_dim, 2]``.
    """
    b, h, t, d = u.shape
    g = u.reshape(b, h, t // group_size, group_size, d).transpose(0, 1, 2, 4, 3)
    codes, params = quantize_groups(g, bits, param_dtype, name)
    codes = codes.transpose(0, 1, 2, 4, 3).reshape(b, h, t, d)
    return codes, params


def dequantize_keys(codes: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_keys`: float32 ``[batch, heads, tokens, head_dim]``."""
    b, h, t, d = codes.shape
    ng = params.shape[2]
    if ng == 0:  # an empty block (a cache of residual tokens only) has no group size to infer
        return np.zeros((b, h, 0, d), np.float32)
    g = codes.reshape(b, h, ng, t // ng, d).transpose(0, 1, 2, 4, 3)
    x = dequantize_groups(g, params)
    return x.transpose(0, 1, 2, 4, 3).reshape(b, h, t, d)


def quantize_values(v: np.ndarray, bits: int, group_size: int, param_dtype: str = "float16",
                    name: str = "v"):
    """Per-token value quantization of ``v[batch, heads, tokens, head_dim]``.

    Returns codes ``uint8 [batch, heads, tokens, head_dim]`` and params
    ``[batch, heads, tokens, head_dim // group_size, 2]``.
    """
    b, h, t, d = v.shape
    g = v.reshape(b, h, t, d // group_size, group_size)
    codes, params = quantize_groups(g, bits, param_dtype, name)
    return codes.reshape(b, h, t, d), params


def dequantize_values(codes: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_values`: float32 ``[batch, heads, tokens, head_dim]``."""
    b, h, t, d = codes.shape
    ng = params.shape[3]
    x = dequantize_groups(codes.reshape(b, h, t, ng, d // ng), params)
    return x.reshape(b, h, t, d)
