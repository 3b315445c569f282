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
