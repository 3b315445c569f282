"""Variable-length rows in one cache (issue 25): the reference semantics, the oracle of the kernels.

Row b of a cache holds ``seq_lens[b]`` tokens: ``seq_lens[b] // R * R`` packed, the rest in its
residual window. Every row must behave exactly like a cache of that row alone: same packed bytes
(its valid prefix), same residual tokens, and decode outputs equal to the row's own within float64
rounding (the batched einsum runs over padding with weight exactly 0; 1e-12 covers a different
summation order). Empty rows (after ``reset_rows``) give zeros and lse -inf.
"""

import numpy as np
import pytest

import oscar
from oscar.cache import _token_axis

from helpers_reference import make_kv, make_q

CFG = oscar.OScaRConfig(residual_length=32)
B, H, D, HQ = 3, 2, 32, 4


def _row_alone(cache, b):
    return cache.copy().select_batch([b])


def _assert_row_equal(cache, b, ref):
    """Row ``b`` of ``cache`` holds exactly the tokens of the uniform one-row cache ``ref``."""
    assert int(cache.seq_lens[b]) == ref.seq_len
    t = ref.quantized_len
    got = cache.packed().arrays()
    for name, want in ref.packed().arrays().items():
        n = _token_axis(name, t, cache.config)
        np.testing.assert_array_equal(got[name][b : b + 1, :, :n], want, err_msg=name)
    kr, vr = cache.residual()
    rk, rv = ref.residual()
    n = ref.residual_len
    np.testing.assert_array_equal(kr[b : b + 1, :, :n], rk)
    np.testing.assert_array_equal(vr[b : b + 1, :, :n], rv)


def _check_decode(cache, rows_alone, q_len=1, start=None):
    q = make_q(B, HQ, q_len, D, seed=5)
    out, lse = oscar.decode_attention(q, cache, return_lse=True, start=start)
    for b, ref in enumerate(rows_alone):
        if ref is None:  # an empty row: zeros, lse -inf
            np.testing.assert_array_equal(out[b], 0)
            assert np.all(np.isneginf(lse[b]))
            continue
        st = None if start is None else np.asarray(start)[b : b + 1]
        o1, l1 = oscar.decode_attention(q[b : b + 1], ref, return_lse=True, start=st)
        np.testing.assert_allclose(out[b : b + 1], o1, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(lse[b : b + 1], l1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lens", [(0, 31, 32), (33, 1, 70), (64, 64, 5)])
def test_prefill_seq_lens_rows_equal_rows_alone(lens):
    t = max(lens) + 3
    k, v = make_kv(B, H, t, D, seed=sum(lens))
    cache = oscar.quantize_kv(k, v, CFG, seq_lens=list(lens))
    np.testing.assert_array_equal(cache.seq_lens, lens)
    np.testing.assert_array_equal(cache.quantized_lens, [n // 32 * 32 for n in lens])
    alone = []
    for b, n in enumerate(lens):
        if n == 0:
            assert int(cache.seq_lens[b]) == 0
            alone.append(None)
            continue
        ref = oscar.quantize_kv(k[b : b + 1, :, :n], v[b : b + 1, :, :n], CFG)
        _assert_row_equal(cache, b, ref)
        alone.append(ref)
    _check_decode(cache, alone)


def test_append_to_rows_of_different_lengths_crosses_their_own_flushes():
    lens = (3, 30, 40)
    t = 80
    k, v = make_kv(B, H, t, D, seed=11)
    cache = oscar.quantize_kv(k, v, CFG, seq_lens=list(lens))
    steps = 35  # row 1 flushes at step 2, row 0 at step 29, row 2 at step 24
    kn, vn = make_kv(B, H, steps, D, seed=12)
    for s in range(steps):
        cache.append(kn[:, :, s : s + 1], vn[:, :, s : s + 1])
    np.testing.assert_array_equal(cache.seq_lens, np.asarray(lens) + steps)
    alone = []
    for b, n in enumerate(lens):
        kk = np.concatenate((k[b : b + 1, :, :n], kn[b : b + 1]), axis=2)
        vv = np.concatenate((v[b : b + 1, :, :n], vn[b : b + 1]), axis=2)
        ref = oscar.quantize_kv(kk, vv, CFG)
        _assert_row_equal(cache, b, ref)
        alone.append(ref)
    _check_decode(cache, alone)
    _check_decode(cache, alone, q_len=2)
    _check_decode(cache, alone, start=[2, 0, 40])


def test_reset_and_refill_a_row_while_the_others_go_on():
    k, v = make_kv(B, H, 70, D, seed=21)
    cache = oscar.quantize_kv(k, v, CFG)
    before = [_row_alone(cache, b) for b in range(B)]
    cache.reset_rows([1])
    np.testing.assert_array_equal(cache.seq_lens, [70, 0, 70])
    q = make_q(B, HQ, 1, D)
    _check_decode(cache, [before[0], None, before[2]])
    k2, v2 = make_kv(1, H, 37, D, seed=22)
    assert cache.fill_row(1, k2, v2) is cache
    _assert_row_equal(cache, 1, oscar.quantize_kv(k2, v2, CFG))
    for b in (0, 2):
        _assert_row_equal(cache, b, before[b])
    kn, vn = make_kv(B, H, 1, D, seed=23)
    cache.append(kn, vn)
    np.testing.assert_array_equal(cache.seq_lens, [71, 38, 71])
    alone = [_row_alone(cache, b) for b in range(B)]
    _check_decode(cache, alone)
    del q


def test_scalar_lengths_raise_on_variable_rows_and_uniform_rows_keep_them():
    k, v = make_kv(B, H, 40, D, seed=31)
    cache = oscar.quantize_kv(k, v, CFG, seq_lens=[40, 40, 40])
    assert cache.seq_len == 40 and cache.quantized_len == 32 and cache.residual_len == 8
    cache.reset_rows(0)
    for name in ("seq_len", "quantized_len", "residual_len"):
        with pytest.raises(ValueError, match=name):
            getattr(cache, name)
    with pytest.raises(ValueError, match="dequantize_kv needs rows of one length"):
        oscar.dequantize_kv(cache)
    assert "variable" in repr(cache)
    assert cache.nbytes > 0 and 0 < cache.bits_per_element


def test_row_errors_name_the_argument_and_leave_the_cache_unchanged():
    k, v = make_kv(B, H, 40, D, seed=41)
    cache = oscar.quantize_kv(k, v, CFG, seq_lens=[40, 10, 33])
    snap = cache.copy()
    k1, v1 = make_kv(1, H, 5, D, seed=42)
    with pytest.raises(ValueError, match="row"):
        cache.fill_row(3, k1, v1)
    with pytest.raises(TypeError, match="row"):
        cache.fill_row(1.0, k1, v1)
    with pytest.raises(ValueError, match="k: expected shape"):
        cache.fill_row(0, k[:2, :, :5], v[:2, :, :5])
    with pytest.raises(ValueError, match="rows"):
        cache.reset_rows([0, 0])
    with pytest.raises(ValueError, match="rows"):
        cache.reset_rows([-1])
    bad = k1.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="k"):
        cache.fill_row(0, bad, v1)
    f16 = oscar.OScaRConfig(residual_length=32)
    big = np.full((1, H, 40, D), 1e6, np.float32)
    big[:, :, :, 0] = -1e6
    c16 = oscar.quantize_kv(k, v, f16, seq_lens=[3, 4, 5])
    before = c16.copy()
    with pytest.raises(ValueError, match="float16"):
        c16.fill_row(1, big, big)
    np.testing.assert_array_equal(c16.seq_lens, before.seq_lens)
    for name, a in before.packed().arrays().items():
        np.testing.assert_array_equal(c16.packed().arrays()[name], a)
    np.testing.assert_array_equal(cache.seq_lens, snap.seq_lens)
    for bad_lens, err in (([1, 2], ValueError), ([0, 41, 3], ValueError),
                          ([1.0, 2.0, 3.0], TypeError)):
        with pytest.raises(err, match="seq_lens"):
            oscar.quantize_kv(k, v, CFG, seq_lens=bad_lens)
    q = make_q(B, HQ, 11, D)
    with pytest.raises(ValueError, match="shortest non-empty row"):
        oscar.decode_attention(q, cache)
    with pytest.raises(ValueError, match="start"):
        oscar.decode_attention(make_q(B, HQ, 1, D), cache, start=[0, 10, 0])


def test_all_rows_reset_is_an_empty_cache_error():
    k, v = make_kv(B, H, 9, D, seed=51)
    cache = oscar.quantize_kv(k, v, CFG)
    cache.reset_rows([0, 1, 2])
    with pytest.raises(ValueError, match="empty cache"):
        oscar.decode_attention(make_q(B, HQ, 1, D), cache)


def test_cu_seqlens_equals_seq_lens():
    lens = [33, 0, 5]
    k, v = make_kv(B, H, max(lens), D, seed=61)
    a = oscar.quantize_kv(k, v, CFG, seq_lens=lens)
    packed_k = np.concatenate([k[b : b + 1, :, : lens[b]] for b in range(B)], axis=2)
    packed_v = np.concatenate([v[b : b + 1, :, : lens[b]] for b in range(B)], axis=2)
    c = oscar.quantize_kv(packed_k, packed_v, CFG, cu_seqlens=np.cumsum([0] + lens))
    np.testing.assert_array_equal(c.seq_lens, lens)
    for b in range(B):
        if lens[b]:
            _assert_row_equal(c, b, _row_alone(a, b))
    for bad, err in (([0, 33, 30, 38], ValueError), ([1, 33, 33, 38], ValueError),
                     ([0.0, 38.0], TypeError)):
        with pytest.raises(err, match="cu_seqlens"):
            oscar.quantize_kv(packed_k, packed_v, CFG, cu_seqlens=bad)
    with pytest.raises(ValueError, match="batch"):
        oscar.quantize_kv(k, v, CFG, cu_seqlens=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="both"):
        oscar.quantize_kv(packed_k, packed_v, CFG, cu_seqlens=[0, 38], seq_lens=[38])
