"""Issue 25 on the kernels: per-row lengths and starts on the device, the device-decided append.

The decode kernels read each row's packed / residual length and first visible token from the
int32 ``lengths [batch, 4]`` array (kernels_numba/common.py); the host's ``quantized_len`` /
``residual_len`` are only bounds that size the split plan. The oracle is the reference with the
same per-row lengths (``reference.attention.decode_attention(seq_lens=, start=)``), built from a
variable-length reference cache.

* Token coverage, exact: with q = 0 every weight is 1, so ``lse = log(visible tokens)`` of each
  row to float32 rounding (one token dropped, doubled or read past a row's length moves it), and
  the packed tails past each row's length are NaN (reading any makes the row NaN).
* Values: out within 2 % of max |v| and lse within 0.02 of the float64 reference at logits of
  standard deviation ~1 (the fixed-length tests in test_kernels_attention.py derive the exact
  bound; here a wrong row, mask or length is off by far more than this).
* The device append (append_rows + the row-flush quantize launch, issued every step) writes the
  same packed bytes as the reference's appends, row by row, across each row's own flushes; a row
  at its capacity takes nothing and sets STATUS_OVERFLOW, never writing out of bounds (the
  simulator's arrays raise on an out-of-bounds index).

Sizes are tiny (simulator): 3 rows, head_dim 64, R = 32.
"""

from __future__ import annotations

import numpy as np
import pytest

import oscar
from oscar.cache import _token_axis
from oscar.kernels_numba import append as KA
from oscar.kernels_numba import attention as K
from oscar.kernels_numba import quantize as KQ
from oscar.kernels_numba._compat import cuda
from oscar.reference.attention import decode_attention as ref_decode

from helpers_reference import make_kv

R = 32
CFG = oscar.OScaRConfig(residual_length=R)
B, H, G, D = 3, 1, 2, 64
CAP = 96  # packed capacity of every row in these tests
U32 = 2.0**-24

pytestmark = pytest.mark.sim


def _varlen_cache(lens, seed):
    k, v = make_kv(B, H, max(lens) + 1, D, seed=seed)
    return oscar.quantize_kv(k, v, CFG, seq_lens=list(lens))


def _device_state(cache, start=None):
    """The reference cache's rows laid out in capacity buffers whose tails past each row's own
    length are poison (NaN params and norms, random codes), plus the lengths array."""
    rng = np.random.default_rng(0)
    lens = cache.seq_lens
    ql, rl = lens // R * R, lens % R
    arrays = {}
    for name, a in cache.packed().arrays().items():
        shape = a.shape[:2] + (_token_axis(name, CAP, CFG),) + a.shape[3:]
        if a.dtype == np.uint32:
            buf = rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)
        else:
            buf = np.full(shape, np.nan, a.dtype)
        for b in range(B):
            n = _token_axis(name, int(ql[b]), CFG)
            buf[b, :, :n] = a[b, :, :n]
        arrays[name] = buf
    kr, vr = cache.residual()
    k_res = np.full((B, H, R, D), np.nan, np.float32)
    v_res = np.full((B, H, R, D), np.nan, np.float32)
    for b in range(B):
        k_res[b, :, : rl[b]] = kr[b, :, : rl[b]]
        v_res[b, :, : rl[b]] = vr[b, :, : rl[b]]
    lengths = K.uniform_lengths(B, 0, 0, start)
    lengths[:, K.LEN_QUANTIZED] = ql
    lengths[:, K.LEN_RESIDUAL] = rl
    return arrays, k_res, v_res, lengths


def _run_decode(arrays, k_res, v_res, lengths, q, bounds, num_splits=2):
    dev = [cuda.to_device(np.ascontiguousarray(x)) for x in (
        q, arrays["k_codes"], arrays["k_params"], arrays["v_codes"], arrays["v_params"],
        arrays["norms"], k_res, v_res)]
    b, hq, lq, d = q.shape
    out = cuda.to_device(np.full((b, hq, lq, d), np.nan, np.float32))
    lse = cuda.to_device(np.full((b, hq, lq), np.nan, np.float32))
    ws = {n: cuda.to_device(np.full(s, np.nan, np.float32) if n != "split_count"
                            else np.zeros(s, np.int32))
          for n, s in K.workspace_shapes(b, hq, lq, d, num_splits).items()}
    K.decode_attention(*dev, out, lse, ws, CFG, 1.0 / np.sqrt(D), bounds[0], bounds[1],
                       "float32", "float32", num_splits, cuda.to_device(lengths))
    return out.copy_to_host(), lse.copy_to_host()


@pytest.mark.parametrize("variant, bounds", [
    ("v3", "longest_row"), ("v3", "capacity"), ("v3_merge_scores_residual", "capacity"),
    ("v1", "longest_row")])
def test_sim_rows_of_different_lengths_and_starts_match_the_reference(variant, bounds,
                                                                      monkeypatch):
    if variant == "v1":
        monkeypatch.setattr(K, "SPLIT_VERSION", 1)
    if variant == "v3_merge_scores_residual":
        monkeypatch.setattr(K, "RESIDUAL_BLOCKS", "off")
    lens = (70, 0, 37)  # a row past two windows, an empty row, a row past one
    start = np.array([33, 0, 5])  # row 0 starts inside its second key group
    cache = _varlen_cache(lens, seed=3)
    arrays, k_res, v_res, lengths = _device_state(cache, start)
    bnd = ((int(max(lens)) // R * R, R - 1) if bounds == "longest_row" else (CAP, R - 1))
    # coverage: q = 0, lse = log(visible tokens) per row, zeros for the empty row
    q0 = np.zeros((B, H * G, 1, D), np.float32)
    out, lse = _run_decode(arrays, k_res, v_res, lengths, q0, bnd)
    count = np.array(lens) - start
    for b in range(B):
        if lens[b] == 0:
            assert np.all(out[b] == 0) and np.all(np.isneginf(lse[b]))
            continue
        assert np.isfinite(out[b]).all(), f"row {b} read past its length"
        np.testing.assert_allclose(lse[b], np.log(count[b]), rtol=0, atol=4 * U32 * 8)
    # values: a random query against the float64 reference
    rng = np.random.default_rng(7)
    q = (0.2 * rng.standard_normal((B, H * G, 1, D))).astype(np.float32)
    out, lse = _run_decode(arrays, k_res, v_res, lengths, q, bnd)
    kr, vr = cache.residual()
    ref_out, ref_lse = ref_decode(q, cache.packed(), kr, vr, CFG, return_lse=True, start=start,
                                  seq_lens=cache.seq_lens)
    vmax = np.abs(vr).max()
    for b in range(B):
        if lens[b] == 0:
            assert np.all(out[b] == 0)
            continue
        np.testing.assert_allclose(out[b], ref_out[b], rtol=0, atol=0.02 * vmax)
        np.testing.assert_allclose(lse[b], ref_lse[b], rtol=0, atol=0.02)


def _append_state(cache, cap):
    """Device buffers of a reference cache for the append test (capacity ``cap``, zeros past
    each row's tokens)."""
    lens = cache.seq_lens
    ql, rl = lens // R * R, lens % R
    dev = {}
    for name, a in cache.packed().arrays().items():
        shape = a.shape[:2] + (_token_axis(name, cap, CFG),) + a.shape[3:]
        buf = np.zeros(shape, a.dtype)
        for b in range(B):
            n = _token_axis(name, int(ql[b]), CFG)
            buf[b, :, :n] = a[b, :, :n]
        dev[name] = cuda.to_device(buf)
    kr, vr = cache.residual()
    k_res = np.zeros((B, H, R, D), np.float32)
    v_res = np.zeros((B, H, R, D), np.float32)
    for b in range(B):
        k_res[b, :, : rl[b]] = kr[b, :, : rl[b]]
        v_res[b, :, : rl[b]] = vr[b, :, : rl[b]]
    lengths = K.uniform_lengths(B, 0, 0)
    lengths[:, K.LEN_QUANTIZED] = ql
    lengths[:, K.LEN_RESIDUAL] = rl
    return dev, cuda.to_device(k_res), cuda.to_device(v_res), cuda.to_device(lengths)


def _device_step(dev, k_res, v_res, lengths, status, cap, k1, v1):
    KA.append_rows(cuda.to_device(k1), cuda.to_device(v1), k_res, v_res, lengths, status, cap)
    kernel, grid, block, args = KQ.quantize_launch(
        k_res, v_res, dev["k_codes"], dev["k_params"], dev["v_codes"], dev["v_params"],
        dev["norms"], status, CFG, "float32", lengths=lengths)
    from oscar.kernels_numba.kernel_cache import launch
    launch(kernel, grid, block, 0, *args)  # always issued: rows whose window did not fill exit


def test_sim_device_append_and_row_flush_write_the_reference_bytes():
    lens = (30, 5, 31)  # rows 0 and 2 flush at steps 2 and 1, row 1 never
    cache = _varlen_cache(lens, seed=5)
    dev, k_res, v_res, lengths = _append_state(cache, CAP)
    status = cuda.to_device(np.zeros(1, np.int32))
    steps = 4
    kn, vn = make_kv(B, H, steps, D, seed=6)
    for s in range(steps):
        k1, v1 = kn[:, :, s : s + 1], vn[:, :, s : s + 1]
        _device_step(dev, k_res, v_res, lengths, status, CAP, np.ascontiguousarray(k1),
                     np.ascontiguousarray(v1))
        cache.append(k1, v1)
    got_len = lengths.copy_to_host()
    np.testing.assert_array_equal(got_len[:, K.LEN_QUANTIZED] + got_len[:, K.LEN_RESIDUAL],
                                  cache.seq_lens)
    assert status.copy_to_host()[0] == 0
    want = cache.packed().arrays()
    for name, d in dev.items():
        got = d.copy_to_host()
        for b in range(B):
            n = _token_axis(name, int(cache.quantized_lens[b]), CFG)
            np.testing.assert_array_equal(got[b, :, :n], want[name][b, :, :n],
                                          err_msg=f"{name} row {b}")
    kr, vr = cache.residual()
    gk, gv = k_res.copy_to_host(), v_res.copy_to_host()
    for b in range(B):
        n = int(cache.residual_lens[b])
        np.testing.assert_array_equal(gk[b, :, :n], kr[b, :, :n])
        np.testing.assert_array_equal(gv[b, :, :n], vr[b, :, :n])


def test_sim_a_row_at_its_capacity_takes_nothing_and_flags_the_status():
    # capacity 32: row 0 (32 packed + 31) has no room for its next window; row 2 (0 + 31) has
    k, v = make_kv(B, H, 64, D, seed=8)
    cache = oscar.quantize_kv(k, v, CFG, seq_lens=[32 + 31, 2, 31])
    dev, k_res, v_res, lengths = _append_state(cache, 64)
    status = cuda.to_device(np.zeros(1, np.int32))
    k1, v1 = make_kv(B, H, 1, D, seed=9)
    before = k_res.copy_to_host()
    _device_step(dev, k_res, v_res, lengths, status, 32, k1, v1)
    got = lengths.copy_to_host()
    assert status.copy_to_host()[0] & KA.STATUS_OVERFLOW
    assert (got[0, K.LEN_QUANTIZED], got[0, K.LEN_RESIDUAL]) == (32, 31)  # row 0 unchanged
    np.testing.assert_array_equal(k_res.copy_to_host()[0], before[0])
    assert tuple(got[2, 1:]) == (32, 0, 1)  # row 2 fills its window and flushes into [0, 32)
    assert tuple(got[1, 1:]) == (0, 3, 0)


def test_device_append_refuses_more_than_one_token():
    lengths = cuda.to_device(np.zeros((B, 4), np.int32))
    k = cuda.to_device(np.zeros((B, H, 2, D), np.float32))
    res = cuda.to_device(np.zeros((B, H, R, D), np.float32))
    status = cuda.to_device(np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="k_new: expected one token"):
        KA.append_rows(k, k, res, res, lengths, status, 64)
    with pytest.raises(ValueError, match="lengths"):
        KA.append_rows(k[:, :, :1], k[:, :, :1], res, res, lengths[:2], status, 64)
