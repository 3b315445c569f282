"""The quantize, dequantize and Hadamard kernels against the NumPy reference: bit for bit.

Every float32 operation of the kernels is the reference's, in the reference's order (FWHT
butterflies, the halving-tree norm, correctly rounded divisions, ``mul.rn`` products that are
never contracted into an FMA), so all comparisons here are *exact*: packed codes, the bits of the
params and norms, and the dequantized float32 outputs. The one documented difference: the kernel stores a zero group
minimum as +0, whereas NumPy's min returns +0 or -0 depending on its SIMD reduction order
(``test_zero_min_sign``); inputs here contain no -0.

Error groups have their own oracle (:func:`poisoned_reference`): a group whose quantizer input is
not finite, or (float16 params) whose min / max / scale exceeds 65504, or that is not constant
and lies entirely below the smallest normal float16 (underflow), gets NaN params and codes 0 and
sets a status bit; every other group equals the reference.

Where the kernels run:
* CUDA simulator (CPU CI, ``NUMBA_ENABLE_CUDASIM=1``, set by conftest.py when no GPU is visible):
  tiny shapes; 32 threads per block for the dequantize and Hadamard kernels (the quantize kernel's
  block is head_dim threads). The simulator runs each CUDA thread as a Python thread and a barrier
  costs a round of thread switches, so 256-thread blocks are ~8x slower; the default dequantize
  launch configuration is still simulated once (``test_default_launch_configuration``). The
  simulator divides with ``/``; the GPU's division sequence is tested on the GPU
  (``test_gpu_exact_division_helpers``).
* GPU: the same tests with the default 256 threads, plus ``gpu``-marked tests at real sizes
  (batch 8, 8 KV heads, head_dim up to 256, a 32K-token prefill) and other launch configurations.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oscar
from oscar.kernels_numba import dequantize as kdq
from oscar.kernels_numba import hadamard as khd
from oscar.kernels_numba import quantize as kq
from oscar.kernels_numba._compat import SIMULATOR, cuda
from oscar.reference import (hadamard_transform, pack_key_codes, pack_value_codes,
                             pack_value_params, unpack_value_params)
from oscar.reference.block import dequantize_block, quantize_block, rotate_and_scale_keys
from oscar.reference.quantize import FLOAT16_MAX, FLOAT16_TINY, quantize_groups

pytestmark = [
    pytest.mark.sim,
    pytest.mark.skipif(not SIMULATOR and not cuda.is_available(),
                       reason="needs a CUDA GPU or the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"),
]

gpu_only = pytest.mark.skipif(
    SIMULATOR or not cuda.is_available(),
    reason="real sizes need a CUDA GPU (the simulator is ~1e7x slower)" if SIMULATOR
    else "no CUDA GPU visible to numba",
)



#: Threads per block under test: the simulator's cost grows with threads per barrier.
THREADS = 32 if SIMULATOR else kdq.THREADS
#: Hypothesis examples of the small-shape tests: a simulated block costs ~0.1-0.3 s; on a GPU
#: each new configuration costs a compile (~1-2 s) instead.
EXAMPLES = 24
INPUT_DTYPES = ("float16", "bfloat16", "float32")


# --- inputs -------------------------------------------------------------------------------------


def as_input(x32: np.ndarray, in_dtype: str):
    """(array in the kernel's input dtype, its exact float32 values). bfloat16 is int16 bits."""
    if in_dtype == "float32":
        x = np.ascontiguousarray(x32, dtype=np.float32)
        return x, x
    if in_dtype == "float16":
        x = x32.astype(np.float16)
        return x, x.astype(np.float32)
    bits = (np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return bits.view(np.int16), (bits.astype(np.uint32) << 16).view(np.float32)


def random_kv(rng, shape, spread: float = 2.0):
    """Keys with token norms over ~two orders of magnitude and a few outlier channels; values
    standard normal (float32, finite, well inside the float16 range)."""
    b, h, t, d = shape
    k = rng.standard_normal(shape) * np.exp(rng.uniform(-spread, spread, size=(b, 1, t, 1)))
    k[..., : max(1, d // 16)] *= 4.0
    v = rng.standard_normal(shape)
    return k.astype(np.float32), v.astype(np.float32)


def config(**kw) -> oscar.OScaRConfig:
    kw.setdefault("residual_length", kw.get("key_group_size", 32))
    return oscar.OScaRConfig(**kw)


# --- running the kernels ------------------------------------------------------------------------

_SENTINEL = 0xA5


def _sentinel_buffer(shape, dtype):
    dtype = np.dtype(dtype)
    raw = np.full(int(np.prod(shape)) * dtype.itemsize, _SENTINEL, np.uint8)
    return raw.view(dtype).reshape(shape)


def packed_shapes(shape, cfg):
    b, h, t, d = shape
    pd = np.float16 if cfg.param_dtype == "float16" else np.float32
    s = 1 if cfg.norm_scope == "token" else h
    return {
        "k_codes": ((b, h, t // 32, d * cfg.key_bits // 32, 32), np.uint32, 2, 32),
        "k_params": ((b, h, t // cfg.key_group_size, d, 2), pd, 2, cfg.key_group_size),
        "v_codes": ((b, h, t, d * cfg.value_bits // 32), np.uint32, 2, 1),
        "v_params": ((b, h, t, d // cfg.value_group_size, 2), pd, 2, 1),
        "norms": ((b, s, t), np.float32, 2, 1),
    }


def _device_input(x, pad_tokens: int):
    """Device copy of x [B, H, T, D]; with pad_tokens, a token slice of a bigger array (a view
    with batch / head strides that are not those of a contiguous [B, H, T, D])."""
    if not pad_tokens:
        return cuda.to_device(x), None
    b, h, t, d = x.shape
    big = np.zeros((b, h, t + 2 * pad_tokens, d), x.dtype)
    big[:, :, pad_tokens:pad_tokens + t] = x
    dev = cuda.to_device(big)
    return dev[:, :, pad_tokens:pad_tokens + t, :], dev


def run_quantize(k_in, v_in, cfg, in_dtype, *, pad=0, status0=0, stream=0):
    """Quantize with the kernel; return the packed arrays (host) and ``status``.

    ``pad``: inputs are token slices of bigger arrays, and outputs are views at a token offset of
    ``pad`` key groups into capacity buffers filled with a sentinel, which must survive outside
    the views.
    """
    shape = k_in.shape
    kd, k_parent = _device_input(k_in, 3 * pad)  # parents stay referenced until the end
    vd, v_parent = _device_input(v_in, 5 * pad)
    bufs, views, host_bufs = {}, {}, {}
    for name, (shp, dt, axis, unit) in packed_shapes(shape, cfg).items():
        if name == "norms" and not cfg.scale_tokens:
            views[name] = cuda.to_device(np.full((1, 1, 1), 7.0, np.float32))
            continue
        off = pad * cfg.key_group_size // unit
        cap = list(shp)
        cap[axis] += 2 * off
        host_bufs[name] = _sentinel_buffer(tuple(cap), dt)
        bufs[name] = cuda.to_device(host_bufs[name])
        idx = [slice(None)] * len(shp)
        idx[axis] = slice(off, off + shp[axis])
        views[name] = bufs[name][tuple(idx)] if pad else bufs[name]
    status = cuda.to_device(np.array([status0], np.int32))
    kq.quantize_block(kd, vd, views["k_codes"], views["k_params"], views["v_codes"],
                      views["v_params"], views["norms"], status, cfg, in_dtype, stream)
    if stream:
        stream.synchronize()
    out = {"status": int(status.copy_to_host()[0])}
    for name, buf in bufs.items():
        host = buf.copy_to_host()
        shp, _, axis, unit = packed_shapes(shape, cfg)[name]
        off = pad * cfg.key_group_size // unit
        idx = [slice(None)] * len(shp)
        idx[axis] = slice(off, off + shp[axis])
        out[name] = np.ascontiguousarray(host[tuple(idx)])
        if pad:  # nothing written outside the view
            outside = host.copy()
            outside[tuple(idx)] = host_bufs[name][tuple(idx)]
            assert np.array_equal(outside.view(np.uint8), host_bufs[name].view(np.uint8)), name
    if not cfg.scale_tokens:
        assert views["norms"].copy_to_host()[0, 0, 0] == 7.0  # placeholder untouched
    del k_parent, v_parent
    return out


def run_dequantize(block, cfg, *, threads=THREADS):
    b, h, t, d = block.v_codes.shape[:3] + (block.k_params.shape[3],)
    k_out = cuda.to_device(np.full((b, h, t, d), np.nan, np.float32))
    v_out = cuda.to_device(np.full((b, h, t, d), np.nan, np.float32))
    norms = block.norms if block.norms is not None else np.ones((1, 1, 1), np.float32)
    dev = [cuda.to_device(np.ascontiguousarray(a)) for a in
           (block.k_codes, block.k_params, block.v_codes, block.v_params, norms)]
    kdq.dequantize_block(*dev, k_out, v_out, cfg, threads=threads)
    return k_out.copy_to_host(), v_out.copy_to_host()


# --- comparisons --------------------------------------------------------------------------------


def _bits(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float16:
        return a.view(np.uint16)
    if a.dtype == np.float32:
        return a.view(np.uint32)
    return a


def assert_bits_equal(name: str, got: np.ndarray, want: np.ndarray) -> None:
    """Equal dtypes, shapes and bits; any NaN equals any NaN (the GPU's canonical float16 NaN is
    0x7FFF, NumPy's 0x7E00)."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    nan_g = np.isnan(got) if got.dtype.kind == "f" else np.zeros(got.shape, bool)
    nan_w = np.isnan(want) if want.dtype.kind == "f" else np.zeros(want.shape, bool)
    bad = (nan_g != nan_w) | (~nan_g & (_bits(got) != _bits(want)))
    if bad.any():
        i = tuple(int(x) for x in np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} differ; first at {i}: "
                             f"got {got[i]!r}, expected {want[i]!r}")


def assert_packed_equal(got: dict, want) -> None:
    for name, arr in want.arrays().items():
        assert_bits_equal(name, got[name], arr)


# --- the oracle for error groups ----------------------------------------------------------------


def _poisoned_groups(x, bits, param_dtype):
    """quantize_groups on ``x[..., group]`` with the kernel's contract for error groups.

    Returns codes, params, nonfinite mask, float16-range mask, float16-underflow mask."""
    nonfinite = ~np.isfinite(x).all(axis=-1)
    clean = np.where(nonfinite[..., None], np.float32(0), x)
    mn, mx = clean.min(axis=-1), clean.max(axis=-1)
    scale = (mx - mn) / np.float32((1 << bits) - 1)
    f16 = np.zeros_like(nonfinite)
    if param_dtype == "float16":
        f16 = ~nonfinite & ((np.abs(mn) > FLOAT16_MAX) | (np.abs(mx) > FLOAT16_MAX)
                            | (np.abs(scale) > FLOAT16_MAX))
    tiny = np.zeros_like(nonfinite)
    if param_dtype == "float16":
        tiny = ~nonfinite & ~f16 & (mx > mn) & (np.maximum(np.abs(mn), np.abs(mx))
                                                < np.float32(FLOAT16_TINY))
    poison = nonfinite | f16 | tiny
    codes, params = quantize_groups(np.where(poison[..., None], np.float32(0), clean), bits,
                                    param_dtype)
    codes[poison] = 0
    params[poison] = np.nan
    return codes, params, nonfinite, f16, tiny


def poisoned_reference(k32, v32, cfg):
    """(packed arrays, expected status) for inputs with non-finite or float16-overflowing groups."""
    b, h, t, d = k32.shape
    u, norms = rotate_and_scale_keys(k32, cfg)
    gk, gv = cfg.key_group_size, cfg.value_group_size
    kg = u.reshape(b, h, t // gk, gk, d).transpose(0, 1, 2, 4, 3)
    kc, kp, k_nf, k_f16, k_uf = _poisoned_groups(kg, cfg.key_bits, cfg.param_dtype)
    kc = kc.transpose(0, 1, 2, 4, 3).reshape(b, h, t, d)
    vr = hadamard_transform(v32) if cfg.rotate_values else v32.astype(np.float32)
    vg = vr.reshape(b, h, t, d // gv, gv)
    vc, vp, v_nf, v_f16, v_uf = _poisoned_groups(vg, cfg.value_bits, cfg.param_dtype)
    arrays = {"k_codes": pack_key_codes(kc, cfg.key_bits), "k_params": kp,
              "v_codes": pack_value_codes(vc.reshape(b, h, t, d), cfg.value_bits),
              "v_params": pack_value_params(vp)}
    if norms is not None:
        arrays["norms"] = norms
    status = (kq.STATUS_NONFINITE * bool(k_nf.any() or v_nf.any())
              | kq.STATUS_FLOAT16_RANGE * bool(k_f16.any() or v_f16.any())
              | kq.STATUS_FLOAT16_UNDERFLOW * bool(k_uf.any() or v_uf.any()))
    return arrays, status


# --- quantize: exact ----------------------------------------------------------------------------


@st.composite
def block_cases(draw, sizes):
    key_group_size, seq_len, head_dims, batches, heads = sizes(draw)
    head_dim = draw(st.sampled_from(head_dims))
    value_bits = draw(st.sampled_from([2, 4, 8]))
    groups = [g for g in (4, 8, 16, 32, 64, 128, 256) if 32 // value_bits <= g <= head_dim]
    cfg = config(
        key_bits=draw(st.sampled_from([2, 4, 8])), value_bits=value_bits,
        key_group_size=key_group_size, value_group_size=draw(st.sampled_from(groups)),
        rotate_keys=draw(st.booleans()), scale_tokens=draw(st.booleans()),
        rotate_values=draw(st.booleans()), norm_scope=draw(st.sampled_from(["token", "head"])),
        param_dtype=draw(st.sampled_from(["float16", "float32"])),
    )
    shape = (draw(st.integers(1, batches)), draw(st.integers(1, heads)), seq_len, head_dim)
    return cfg, shape, draw(st.sampled_from(INPUT_DTYPES)), draw(st.integers(0, 2**32 - 1)), \
        draw(st.integers(0, 1))


def _sim_sizes(draw):
    # one or two key groups of 32 tokens, or one group of 64
    gk, t = draw(st.sampled_from([(32, 32), (32, 64), (64, 64)]))
    return gk, t, (32, 64), 3, 3


def check_quantize_case(cfg, shape, in_dtype, seed, pad):
    k_in, k32 = as_input(random_kv(np.random.default_rng(seed), shape)[0], in_dtype)
    v_in, v32 = as_input(random_kv(np.random.default_rng(seed + 1), shape)[1], in_dtype)
    want = quantize_block(k32, v32, cfg)
    got = run_quantize(k_in, v_in, cfg, in_dtype, pad=pad)
    assert got["status"] == 0
    assert_packed_equal(got, want)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(block_cases(_sim_sizes))
def test_quantize_equals_reference(case):
    check_quantize_case(*case)


@pytest.mark.parametrize("name, shape, changes, in_dtype", [
    # one key group of 128 tokens: four sub-tiles, min / max then a second pass for the codes
    ("group128", (1, 1, 128, 32), dict(key_group_size=128), "bfloat16"),
    # 5 heads: the token norm's halving tree pads the heads to 8 with zeros
    ("heads5", (1, 5, 32, 32), dict(key_bits=4), "float16"),
    # head_dim 64, value group = head_dim, 8-bit keys, float32 params
    ("d64_vgroup64", (2, 1, 32, 64), dict(key_bits=8, value_group_size=64,
                                          param_dtype="float32"), "float32"),
    # smallest value group for 8 bits: one word per group
    ("vgroup4", (1, 2, 32, 32), dict(value_bits=8, value_group_size=4), "float32"),
    # per-head norms with two key groups of 64
    ("head_scope_g64", (1, 2, 128, 32), dict(key_group_size=64, norm_scope="head"), "bfloat16"),
])
def test_quantize_fixed_cases(name, shape, changes, in_dtype):
    check_quantize_case(config(**changes), shape, in_dtype, seed=zlib.crc32(name.encode()), pad=1)


def test_default_launch_configuration():
    """The dequantize wrapper's default threads per block (256), simulated once on a small case
    (the quantize kernel's block is always head_dim threads)."""
    block = quantize_block(*random_kv(np.random.default_rng(6), (1, 1, 32, 32)), config())
    k_hat, v_hat = run_dequantize(block, config(), threads=kdq.THREADS)
    want_k, want_v = dequantize_block(block, config())
    assert_bits_equal("k_hat", k_hat, want_k)
    assert_bits_equal("v_hat", v_hat, want_v)


def test_lossless_designed_input():
    """Values on the quantization grid of every group come back exactly (KIVI: no rotation,
    no scaling). Each channel's keys and each value group take the values mn + c * step with
    c = 0..3 all present, step and mn exact in float16."""
    cfg = config(rotate_keys=False, scale_tokens=False, rotate_values=False)
    rng = np.random.default_rng(3)
    shape = (1, 2, 32, 32)
    # every channel's 32 tokens hold the codes 0, 1, 2, 3 eight times each, shuffled
    codes = np.broadcast_to(np.repeat(np.arange(4), 8)[:, None], shape).copy()
    codes = rng.permuted(codes, axis=2).astype(np.float32)
    mn_k = rng.integers(-8, 8, size=(1, 2, 1, 32)).astype(np.float32)
    step_k = np.float32(2.0) ** rng.integers(-4, 3, size=(1, 2, 1, 32)).astype(np.float32)
    k = mn_k + codes * step_k
    vcodes = np.broadcast_to(np.repeat(np.arange(4), 8), shape).copy()
    vcodes = rng.permuted(vcodes, axis=3).astype(np.float32)
    v = np.float32(-1.5) + vcodes * np.float32(0.25)
    assert k.shape == v.shape == shape
    got = run_quantize(k, v, cfg, "float32")
    assert_packed_equal(got, quantize_block(k, v, cfg))
    block = quantize_block(k, v, cfg)
    k_hat, v_hat = run_dequantize(block, cfg)
    assert np.array_equal(k_hat, k) and np.array_equal(v_hat, v)


def test_constant_and_zero_tokens():
    """Zero tokens (norm 0 -> stored 1), constant groups (scale 0 -> codes 0)."""
    cfg = config()
    k, v = random_kv(np.random.default_rng(4), (1, 2, 64, 32))
    k[:, :, 3] = 0.0
    k[:, :, 32:] = 1.25  # a constant key group in every channel (rotation keeps it constant)
    v[:, :, 7] = 0.0
    v[:, 1, 9] = -2.0
    got = run_quantize(k, v, cfg, "float32")
    want = quantize_block(k, v, cfg)
    assert want.norms[0, 0, 3] == 1.0
    assert_packed_equal(got, want)


def test_subnormal_midpoint_quotients():
    """Scaled keys that are exactly a float32 midpoint below 2**-126: channel 1 of token t is
    +-(2 t + 1) * 49 * 2**-149 and the token's norm is exactly 98 (channel 0), so u = +-(2 t +
    1) * 2**-150, a tie that IEEE division rounds to even. The float64 product with 1/98 rounds
    some of them the other way (asserted); the kernel's rare path must not. float32 params keep
    the subnormal min and max of channel 1 in the stored bits."""
    cfg = config(rotate_keys=False, param_dtype="float32")
    k, v = random_kv(np.random.default_rng(9), (1, 1, 32, 32))
    k[...] = 0.0
    k[..., 0] = 98.0
    t = np.arange(32)
    sign = np.where(t % 3, 1.0, -1.0)
    k[0, 0, :, 1] = ((2 * t + 1) * 49 * np.exp2(-149.0) * sign).astype(np.float32)
    a = k[0, 0, :, 1]
    u = a / np.float32(98.0)
    assert np.array_equal(u.astype(np.float64), sign * 2 * np.round((2 * t + 1) / 4) *
                          np.exp2(-149.0))  # ties to even
    assert (np.float32(a.astype(np.float64) * (1.0 / 98.0)) != u).any()  # a case that tests
    got = run_quantize(k, v, cfg, "float32")
    assert_packed_equal(got, quantize_block(k, v, cfg))


def test_zero_min_sign():
    """A group whose minimum is zero stores +0 even when its zeros are -0 (NumPy's min returns
    either sign depending on the reduction order, so the reference's bit there is not defined);
    codes and dequantized values do not depend on that sign."""
    cfg = config(rotate_keys=False, scale_tokens=False, rotate_values=False)
    k, v = random_kv(np.random.default_rng(8), (1, 1, 32, 32))
    k = np.abs(k)
    k[:, :, 5, 2] = -0.0
    k[:, :, 6, 2] = 0.0
    v = np.abs(v)
    v[:, :, 4, 0] = -0.0
    got = run_quantize(k, v, cfg, "float32")
    assert _bits(got["k_params"])[0, 0, 0, 2, 1] == 0  # +0 in float16
    assert _bits(unpack_value_params(got["v_params"]))[0, 0, 4, 0, 1] == 0  # token-major
    want = quantize_block(k, v, cfg)
    for name in ("k_codes", "v_codes"):
        assert_bits_equal(name, got[name], getattr(want, name))
    for name in ("k_params", "v_params"):  # equal as numbers (+0 == -0)
        assert np.array_equal(got[name], getattr(want, name))


# --- quantize: error groups and status ----------------------------------------------------------


@pytest.mark.parametrize("name, changes, where, value, status", [
    # NaN in a key: rotation spreads it over the (head, token) row, so all channels of that head's
    # key group are poisoned; the token's norm is not finite, so that token is stored unscaled in
    # the other heads (as in the reference).
    ("nan_key_rotated", {}, ("k", 0, 1, 5, 3), np.nan, 1),
    # Inf in a key without rotation: only that channel's group; the token is stored unscaled.
    ("inf_key_scaling_only", dict(rotate_keys=False), ("k", 1, 0, 40, 7), np.inf, 1),
    # NaN in a value with rotation: every value group of that token of that head.
    ("nan_value_rotated", {}, ("v", 0, 0, 2, 9), np.nan, 1),
    # -Inf in a value without rotation, float32 params: that value group only.
    ("ninf_value", dict(rotate_values=False, param_dtype="float32"), ("v", 1, 1, 63, 31),
     -np.inf, 1),
    # float16 params cannot hold a key of 1e5 (KIVI keeps it in one channel group).
    ("f16_range_key", dict(rotate_keys=False, scale_tokens=False), ("k", 0, 1, 33, 4), 1e5, 2),
    # ... nor a value of -7e4 (-65504 is the float16 limit).
    ("f16_range_value", dict(rotate_values=False), ("v", 1, 0, 8, 20), -7e4, 2),
    # ... nor a value group that lies entirely below 2**-14 (scale and min would underflow)
    ("f16_underflow_value", dict(rotate_values=False, value_group_size=16), ("v", 0, 1, 9, 4),
     "tiny", 4),
    # ... nor a key channel group below 2**-14 (KIVI keys: the raw values are quantized)
    ("f16_underflow_key", dict(rotate_keys=False, scale_tokens=False), ("k", 1, 0, 32, 5),
     "tiny", 4),
])
def test_error_groups(name, changes, where, value, status):
    cfg = config(**changes)
    k, v = random_kv(np.random.default_rng(9), (2, 2, 64, 32))
    which, *idx = where
    x = k if which == "k" else v
    if isinstance(value, str):  # "tiny": the whole group of that element, scaled by 1e-6
        b, h, t, c = idx
        if which == "k":  # a channel over one key group of tokens
            g = cfg.key_group_size
            x[b, h, t // g * g: t // g * g + g, c] *= np.float32(1e-6)
        else:  # a token over one value group of channels
            g = cfg.value_group_size
            x[b, h, t, c // g * g: c // g * g + g] *= np.float32(1e-6)
    else:
        x[tuple(idx)] = value
    want, want_status = poisoned_reference(k, v, cfg)
    assert want_status == status
    if status in (2, 4):  # the reference refuses the whole block; the kernel flags it
        with pytest.raises(ValueError, match="float16"):
            quantize_block(k, v, cfg)
    got = run_quantize(k, v, cfg, "float32", status0=8)
    assert got["status"] == status | 8  # OR-ed into the existing status, never cleared
    for key, arr in want.items():
        assert_bits_equal(key, got[key], arr)
    params = got["k_params"] if which == "k" else got["v_params"]
    assert np.isnan(params).any()


def test_error_groups_bfloat16_input():
    """A bfloat16 NaN (int16 bits 0x7FC0) is detected like a float32 one."""
    cfg = config(rotate_keys=False)
    k, v = random_kv(np.random.default_rng(10), (1, 1, 32, 32))
    k_in, k32 = as_input(k, "bfloat16")
    v_in, v32 = as_input(v, "bfloat16")
    k_in[0, 0, 3, 5] = np.int16(0x7FC0)
    k32[0, 0, 3, 5] = np.nan
    want, want_status = poisoned_reference(k32, v32, cfg)
    got = run_quantize(k_in, v_in, cfg, "bfloat16")
    assert got["status"] == want_status == 1
    for key, arr in want.items():
        assert_bits_equal(key, got[key], arr)


# --- Hadamard -----------------------------------------------------------------------------------


def check_hadamard(rows, head_dim, in_dtype, seed, threads=THREADS):
    rng = np.random.default_rng(seed)
    x_in, x32 = as_input(rng.standard_normal((rows, head_dim)).astype(np.float32) * 3, in_dtype)
    out = cuda.to_device(np.full((rows, head_dim), np.nan, np.float32))
    khd.hadamard_transform(cuda.to_device(x_in), out, in_dtype, threads=threads)
    assert_bits_equal("hadamard", out.copy_to_host(), hadamard_transform(x32))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.sampled_from([1, 3, 8, 17]), head_dim=st.sampled_from([32, 64]),
       in_dtype=st.sampled_from(INPUT_DTYPES), seed=st.integers(0, 2**32 - 1))
def test_hadamard_equals_reference(rows, head_dim, in_dtype, seed):
    check_hadamard(rows, head_dim, in_dtype, seed)


def test_hadamard_several_blocks():
    # 130 rows of 32: two blocks, the second with 2 rows (rows_per_block(32) = 128)
    assert khd.rows_per_block(32) == 128
    check_hadamard(130, 32, "float32", seed=1)


# --- dequantize ---------------------------------------------------------------------------------


def check_dequantize_case(cfg, shape, in_dtype, seed, _pad, threads=THREADS):
    _, k32 = as_input(random_kv(np.random.default_rng(seed), shape)[0], in_dtype)
    _, v32 = as_input(random_kv(np.random.default_rng(seed + 1), shape)[1], in_dtype)
    block = quantize_block(k32, v32, cfg)
    k_hat, v_hat = run_dequantize(block, cfg, threads=threads)
    want_k, want_v = dequantize_block(block, cfg)
    # Exact: min + float32(code * scale) (mul.rn, no FMA), * norm (mul.rn), the reference's
    # butterflies, * 1/sqrt(D) (mul.rn): every operation rounds once, as in NumPy.
    assert_bits_equal("k_hat", k_hat, want_k)
    assert_bits_equal("v_hat", v_hat, want_v)


@settings(max_examples=max(8, EXAMPLES // 2), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(block_cases(_sim_sizes))
def test_dequantize_equals_reference(case):
    check_dequantize_case(*case)


# --- input validation (no launch) ----------------------------------------------------------------


def test_validation_errors():
    cfg = config()
    shape = (1, 2, 32, 32)
    k = cuda.to_device(np.zeros(shape, np.float32))
    arrays = {name: cuda.to_device(np.zeros(shp, dt))
              for name, (shp, dt, _, _) in packed_shapes(shape, cfg).items()}
    status = cuda.to_device(np.zeros(1, np.int32))
    args = [arrays[n] for n in ("k_codes", "k_params", "v_codes", "v_params", "norms")]
    with pytest.raises(ValueError, match="in_dtype"):
        kq.quantize_block(k, k, *args, status, cfg, "float64")
    with pytest.raises(TypeError, match="k: expected dtype float16"):
        kq.quantize_block(k, k, *args, status, cfg, "float16")
    bad_norms = cuda.to_device(np.zeros((1, 2, 32), np.float32))
    with pytest.raises(ValueError, match=r"norms: expected shape \(1, 1, 32\)"):
        kq.quantize_block(k, k, *args[:4], bad_norms, status, cfg, "float32")
    with pytest.raises(ValueError, match="seq_len a multiple of key_group_size"):
        kq.quantize_block(k, k, *args, status, config(key_group_size=64), "float32")
    with pytest.raises(TypeError, match="threads"):
        kq.quantize_block(k, k, *args, status, cfg, "float32", threads=48)
    flat = cuda.to_device(np.zeros(2 * 32 * 32 + 1, np.float32))
    shifted = flat[1:].reshape(shape)  # base 4 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match="v: expected rows contiguous along head_dim"):
        kq.quantize_block(k, shifted, *args, status, cfg, "float32")
    with pytest.raises(ValueError, match="v_out: expected shape"):
        kdq.dequantize_block(*args, k, cuda.to_device(np.zeros((1, 2, 64, 32), np.float32)), cfg)
    with pytest.raises(ValueError, match="out: expected shape"):
        khd.hadamard_transform(cuda.to_device(np.zeros((4, 32), np.float32)),
                               cuda.to_device(np.zeros((4, 64), np.float32)), "float32")


# --- GPU: real sizes ----------------------------------------------------------------------------

LLAMA = dict(batch=1, heads=8, head_dim=128)  # Llama-3.1-8B KV shapes


def _gpu_sizes(draw):
    gk = draw(st.sampled_from([32, 64, 128]))
    return gk, gk * draw(st.integers(1, 8)), (64, 128, 256), 8, 8


@pytest.mark.gpu
@gpu_only
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=block_cases(_gpu_sizes), threads=st.sampled_from([64, 256]))
def test_gpu_quantize_and_dequantize_random(case, threads):
    check_quantize_case(*case)
    check_dequantize_case(*case, threads=threads)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("name, shape, changes, in_dtype", [
    ("prefill_32k_llama", (1, 8, 32768, 128), {}, "bfloat16"),
    ("flush_128_batch8", (8, 8, 128, 128), {}, "bfloat16"),
    ("d256_g128_4bit_f32params", (4, 8, 1024, 256),
     dict(key_bits=4, value_bits=4, key_group_size=128, param_dtype="float32"), "float16"),
    ("d64_head_scope_8bit", (2, 8, 2048, 64),
     dict(key_bits=8, key_group_size=64, value_group_size=64, norm_scope="head"), "float32"),
    ("kivi", (8, 8, 512, 128), dict(rotate_keys=False, scale_tokens=False, rotate_values=False),
     "float16"),
    ("heads5_d256", (3, 5, 256, 256), dict(value_bits=4, value_group_size=128), "bfloat16"),
    ("heads32_token_scope", (1, 32, 256, 128), {}, "bfloat16"),
])
def test_gpu_real_sizes(name, shape, changes, in_dtype):
    cfg = config(**changes)
    seed = zlib.crc32(name.encode())
    check_quantize_case(cfg, shape, in_dtype, seed=seed, pad=1)
    if shape[2] <= 4096:
        check_dequantize_case(cfg, shape, in_dtype, seed=seed, _pad=0)


@pytest.mark.gpu
@gpu_only
def test_gpu_stream_argument():
    """Launch on a non-default stream: results after that stream's synchronize."""
    cfg = config()
    k, v = random_kv(np.random.default_rng(12), (2, 8, 256, 128))
    stream = cuda.stream()
    got = run_quantize(k, v, cfg, "float32", stream=stream)
    assert_packed_equal(got, quantize_block(k, v, cfg))


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_hadamard_many_rows(head_dim):
    for in_dtype in INPUT_DTYPES:
        check_hadamard(8 * 8 * 1000 + 3, head_dim, in_dtype, seed=head_dim)


def _wide_float32(rng, n, lo, hi):
    """float32 with random significands and exponents in [lo, hi], random signs."""
    sig = rng.uniform(1.0, 2.0, n)
    sig[: n // 8] = 2.0 - 2.0 ** -23  # all-ones significands, the hard case for reciprocals
    return (sig * np.exp2(rng.integers(lo, hi + 1, n)) * rng.choice([-1.0, 1.0], n)).astype(
        np.float32)


@pytest.mark.gpu
@gpu_only
def test_gpu_exact_division_helpers():
    """``recip`` is RN(1/d) and ``div_exact`` (every path of the key scaling) is RN(a/d) on 4M
    pairs over wide exponent ranges (including all-ones significands, tiny and zero numerators,
    subnormal quotients and quotients that are exactly a subnormal midpoint): the quantize
    kernel divides without a div.rn instruction."""
    rng = np.random.default_rng(17)
    n = 1 << 22
    d = np.abs(_wide_float32(rng, n, -60, 60))
    a = _wide_float32(rng, n, -140, 60)
    a[::97] = 0.0
    a[1::97] = np.float32(1e-44)  # subnormal numerators
    # quotients that are exactly a float32 midpoint below 2**-126: a = (2k + 1) d' 2**(e - 150)
    # and d = d' 2**e (d' odd), e.g. a = 147 * 2**-149, d = 98; ties go to the even neighbour
    m = n // 16
    dodd = 2 * rng.integers(1, 1 << 9, m) + 1
    kodd = 2 * rng.integers(0, 1 << 13, m) + 1
    e = rng.integers(1, 40, m)
    d[-m:] = (dodd * np.exp2(e)).astype(np.float32)
    a[-m:] = (kodd * dodd * np.exp2(e - 150.0) * rng.choice([-1.0, 1.0], m)).astype(np.float32)
    assert np.array_equal(a[-m:].astype(np.float64) / d[-m:], kodd * np.exp2(-150.0) * np.sign(
        a[-m:]))  # exact midpoints

    @cuda.jit
    def divide(a, d, q, r):
        i = cuda.grid(1)
        if i < a.size:
            rr, r64 = kq.recip(d[i])
            r[i] = rr
            q[i] = kq.div_exact(a[i], d[i], rr, r64, max(d[i] * kq._FAST_MIN, kq._FAST_FLOOR))

    q = cuda.device_array(n, np.float32)
    r = cuda.device_array(n, np.float32)
    divide[(n + 255) // 256, 256](cuda.to_device(a), cuda.to_device(d), q, r)
    with np.errstate(under="ignore"):
        assert_bits_equal("recip", r.copy_to_host(), np.float32(1.0) / d)
        assert_bits_equal("quotient", q.copy_to_host(), a / d)


@pytest.mark.parametrize("head_split_below", [1, 1 << 30])
@pytest.mark.parametrize("name, shape, changes", [
    ("heads5", (1, 5, 32, 32), dict(key_bits=4)),
    ("heads3_group64", (2, 3, 64, 64), dict(key_group_size=64)),
])
def test_quantize_head_split_modes(monkeypatch, head_split_below, name, shape, changes):
    """Both launch shapes of a token-norm configuration: one block per key group walking every
    head, and one block per (key group, head) recomputing the norms (small launches)."""
    monkeypatch.setattr(kq, "HEAD_SPLIT_BELOW", head_split_below)
    check_quantize_case(config(**changes), shape, "bfloat16", seed=zlib.crc32(name.encode()),
                        pad=0)
