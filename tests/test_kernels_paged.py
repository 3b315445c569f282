"""The paged specialization of the v3 split kernel (issue 27): decode through the block table.

The paged kernel reads tile t of row b from page ``block_table[b, t // (P / 32)]`` of a page
pool (the section views of ``reference.paged.PageLayout``); everything else is the contiguous
v3 kernel's code. Oracles:

* the contiguous v3 kernel on the same tokens, same lengths and the same split plan: the paged
  outputs and lse must be **bit for bit** the same (same arithmetic in the same order; only the
  addresses differ), so a tile read from a wrong page or offset cannot hide in a tolerance;
* the float64 reference of the variable-length cache, within the varlen tests' tolerance.

Pools are poisoned (pages nobody owns hold NaN params and random codes) and the block tables
padded with -1 past each row's pages, so reading any page or entry a row does not own shows.
Shapes are tiny (simulator): 2-3 rows, 2 KV heads, GQA 2, head_dim 64, R = 32, P = 64.
"""

from __future__ import annotations

import numpy as np
import pytest

import oscar
from oscar.kernels_numba import attention as K
from oscar.kernels_numba._compat import SIMULATOR, cuda
from oscar.reference.attention import decode_attention as ref_decode
from oscar.reference.block import PackedBlock
from oscar.reference.paged import page_layout, slot_mapping, write_pages

from helpers_reference import make_kv

R, P = 32, 64
H, G, D = 2, 2, 64


def _fake(x):
    """A device view of ``x``: in the simulator without a copy (strided page views stay
    strided); on a GPU a copy (C-contiguous arrays only: page views go through _pool_views)."""
    if not SIMULATOR:
        return cuda.to_device(np.ascontiguousarray(x))
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    return FakeCUDAArray(x)


def _pool_views(pool, layout):
    """Device section views of a host pool: the simulator's NumPy views, or on a GPU strided
    views of one device copy of the pool (the store's own construction)."""
    if SIMULATOR:
        return {n: _fake(x) for n, x in layout.views(pool).items()}
    from oscar._paged_cuda import _ArrayView

    d_pool = cuda.to_device(pool)
    base = d_pool.device_ctypes_pointer.value
    out = {}
    for name, (off, shape, dt) in layout.sections.items():
        strides, size = [], np.dtype(dt).itemsize
        for n in reversed(shape):
            strides.insert(0, size)
            size *= n
        out[name] = cuda.as_cuda_array(_ArrayView(d_pool, base + off, (len(pool),) + shape,
                                                  (layout.page_bytes,) + tuple(strides), dt))
    return out


def _state(cfg, lens, seed, share_prefix=True, h=H, d=D, p=P):
    """Variable-length reference cache (row 1 repeats row 0's first P tokens), its pages in a
    poisoned pool through shuffled block tables (row 1 shares row 0's first page), and the
    contiguous arrays at capacity for the contiguous kernel."""
    H, D, P = h, d, p  # noqa: N806 (the module's tiny shapes unless given)
    R = cfg.residual_length  # noqa: N806
    rng = np.random.default_rng(seed)
    b = len(lens)
    k, v = make_kv(b, H, max(lens) + 1, D, seed=seed)
    if share_prefix:
        k[1, :, :P] = k[0, :, :P]
        v[1, :, :P] = v[0, :, :P]
    cache = oscar.quantize_kv(k, v, cfg, seq_lens=list(lens))
    ql = np.asarray(lens) // R * R
    layout = page_layout(cfg, P, H, D)
    need = [-(-int(q) // P) for q in ql]
    num_pages = sum(need) + 3
    pool = rng.integers(0, 256, (num_pages, layout.page_bytes), dtype=np.uint8)
    views = layout.views(pool)
    for name in ("k_params", "v_params", "norms"):
        if name in views:
            views[name][...] = np.nan
    free = list(rng.permutation(num_pages))
    table = np.full((b, max(need) + 2), -1, np.int32)
    for i in range(b):
        if share_prefix and i == 1 and need[1] >= 1 and ql[0] >= P:
            table[1, 0] = table[0, 0]  # the shared page (row 0 wrote the same bytes)
            table[1, 1:need[1]] = [free.pop() for _ in range(need[1] - 1)]
        else:
            table[i, :need[i]] = [free.pop() for _ in range(need[i])]
        n = int(ql[i])
        if n:
            full = cache.packed()
            blk = PackedBlock(**{name: (None if getattr(full, name) is None else
                                        getattr(full, name)[i:i + 1, :, :_rows(name, n, cfg)])
                                 for name in ("k_codes", "k_params", "v_codes", "v_params",
                                              "norms")})
            write_pages(views, layout, blk, slot_mapping(table[i], np.arange(n), P))
    lengths = K.uniform_lengths(b, 0, 0)
    lengths[:, K.LEN_QUANTIZED] = ql
    lengths[:, K.LEN_RESIDUAL] = np.asarray(lens) % R
    return cache, pool, views, table, lengths


def _rows(name, tokens, cfg):
    return {"k_codes": tokens // 32, "k_params": tokens // cfg.key_group_size}.get(name, tokens)


def _run(cfg, q, arrays, cache, lengths, bound, num_splits, table=None, pool=None, p=P,
         q_dtype="float32"):
    """One decode (contiguous when ``table`` is None, else paged: ``arrays`` = page views of
    host ``pool``)."""
    b, hq, lq, d = q.shape
    H, D, R = arrays["k_codes"].shape[1], d, cfg.residual_length  # noqa: N806
    kr, vr = cache.residual()
    k_res = np.zeros((b, H, R, D), np.float32)
    v_res = np.zeros((b, H, R, D), np.float32)
    for i in range(b):
        n = int(lengths[i, K.LEN_RESIDUAL])
        k_res[i, :, :n] = kr[i, :, :n]
        v_res[i, :, :n] = vr[i, :, :n]
    out = np.full((b, hq, lq, d), np.nan, np.float16 if q_dtype == "float16" else np.float32)
    lse = np.full((b, hq, lq), np.nan, np.float32)
    ws = {n: (np.full(s, np.nan, np.float32) if n != "split_count" else np.zeros(s, np.int32))
          for n, s in K.workspace_shapes(b, hq, lq, d, num_splits).items()}
    norms = arrays.get("norms")
    if norms is None:
        norms = np.zeros((1, 1, 1), np.float32)
    if table is None:
        dev = {n: _fake(a) for n, a in arrays.items()}
        extra = {}
    else:
        dev = _pool_views(pool, page_layout(cfg, p, H, D))
        extra = {"block_table": _fake(table), "page_size": p}
    d_norms = dev["norms"] if "norms" in arrays else _fake(norms)
    packed = [dev[n] for n in ("k_codes", "k_params", "v_codes", "v_params")]
    qx = np.ascontiguousarray(q.astype(np.float16) if q_dtype == "float16" else q)
    d_out, d_lse = _fake(out), _fake(lse)
    K.decode_attention(_fake(qx), *packed, d_norms, _fake(k_res.astype(qx.dtype)),
                       _fake(v_res.astype(qx.dtype)), d_out, d_lse,
                       {n: _fake(w) for n, w in ws.items()}, cfg, 1.0 / np.sqrt(D), bound, R - 1,
                       q_dtype, q_dtype, num_splits, _fake(lengths), **extra)
    if not SIMULATOR:
        return d_out.copy_to_host(), d_lse.copy_to_host()
    return out, lse


def _contiguous(cache, cfg, cap):
    out = {}
    for name, a in cache.packed().arrays().items():
        if a is None:
            continue
        rows = _rows(name, cap, cfg)
        buf = np.zeros(a.shape[:2] + (rows,) + a.shape[3:], a.dtype)
        n = min(rows, a.shape[2])
        buf[:, :, :n] = a[:, :, :n]
        out[name] = buf
    return out


_SIM_ONLY = pytest.mark.skipif(not SIMULATOR, reason="simulator shapes (GPU: the test below)")


@pytest.mark.sim
@_SIM_ONLY
@pytest.mark.parametrize("q_len, norm_scope, num_splits, rows_max",
                         [(1, "token", 2, None), (3, "token", 1, 3)])
def test_sim_paged_kernel_equals_contiguous_bit_for_bit_and_the_reference(
        q_len, norm_scope, num_splits, rows_max, monkeypatch):
    """Random block tables, a shared prefix page, rows of different lengths (one spanning two
    pages, one of a single, shared page): the paged kernel equals the contiguous v3 kernel bit
    for bit and the reference within the varlen tests' tolerance, over two splits. (q_len 2 and
    head-scoped norms: tests/test_paged_cuda.py, through the cache; row groups, rows > 8, share
    the paged prefetch: the compile test covers them, the GPU test runs them.) ``rows_max``:
    a block's rows lowered (attention_mma.ROWS_MAX) so that G 2 x q_len 3 = 6 rows run in 2 row
    blocks of 3, whose paged reads must equal the contiguous kernel's too."""
    if rows_max:
        monkeypatch.setattr(K._split_v3, "ROWS_MAX", rows_max)
        for f in (K._compiled_split, K._blocks_per_sm, K._residual_in_split):
            f.cache_clear()
        key = K._split_key(oscar.OScaRConfig(residual_length=R), D, G, q_len, "float32",
                           "float32")
        assert K.row_blocks(key) == 2
    try:
        _paged_equals_contiguous(q_len, norm_scope, num_splits)
    finally:
        if rows_max:
            for f in (K._compiled_split, K._blocks_per_sm, K._residual_in_split):
                f.cache_clear()


def _paged_equals_contiguous(q_len, norm_scope, num_splits):
    cfg = oscar.OScaRConfig(residual_length=R, norm_scope=norm_scope)
    lens = (136, 70)  # packed 128 (2 pages), 64 (row 0's first page, shared)
    cache, _pool, views, table, lengths = _state(cfg, lens, seed=3)
    assert table[1, 0] == table[0, 0] and (table[:, 2:] == -1).all()
    assert K.paged_unsupported(cfg, D, G, q_len, P) is None
    bound = int(lengths[:, K.LEN_QUANTIZED].max())
    rng = np.random.default_rng(7)
    q = (0.3 * rng.standard_normal((len(lens), H * G, q_len, D))).astype(np.float32)
    want, want_lse = _run(cfg, q, _contiguous(cache, cfg, 256), cache, lengths, bound,
                          num_splits)
    got, got_lse = _run(cfg, q, views, cache, lengths, bound, num_splits, table, _pool)
    assert np.array_equal(got, want) and np.array_equal(got_lse, want_lse)
    assert np.isfinite(got).all()  # a poisoned page (NaN params) read anywhere would be NaN
    kr, vr = cache.residual()
    ref_out, ref_lse = ref_decode(q, cache.packed(), kr, vr, cfg, return_lse=True,
                                  seq_lens=cache.seq_lens)
    vmax = np.abs(vr).max()
    np.testing.assert_allclose(got, ref_out, rtol=0, atol=0.02 * vmax)
    np.testing.assert_allclose(got_lse, ref_lse, rtol=0, atol=0.02)


@pytest.mark.sim
@_SIM_ONLY
def test_sim_paged_kernel_rejects_bad_block_tables():
    """ValueError / TypeError from the launcher's checks (decode_attention runs them before any
    launch): page ids out of range in the entries a row
    reads (entries past them may be anything), wrong dtype, wrong row count, a page size the
    kernel has no specialization for, views of different pools."""
    cfg = oscar.OScaRConfig(residual_length=R)
    lens = (200, 70, 37)
    cache, _pool, views, table, lengths = _state(cfg, lens, seed=5)
    bound = int(lengths[:, K.LEN_QUANTIZED].max())
    q = np.zeros((3, H * G, 1, D), np.float32)

    def run(tab, **kw):  # the launcher's checks only (they run before any launch)
        b, hq, lq, d = q.shape
        ws = {n: _fake(np.zeros(s, np.float32 if n != "split_count" else np.int32))
              for n, s in K.workspace_shapes(b, hq, lq, d, 1).items()}
        res = _fake(np.zeros((b, H, R, D), np.float32))
        arrays = dict(views, **kw.pop("arrays", {}))
        K._check_arguments(_fake(q), *(_fake(arrays[n]) for n in (
            "k_codes", "k_params", "v_codes", "v_params", "norms")), res, res,
            _fake(np.zeros(q.shape, np.float32)), _fake(np.zeros(q.shape[:3], np.float32)), ws,
            cfg, bound, R - 1, "float32", "float32", 1, _fake(lengths),
            block_table=_fake(tab), page_size=kw.pop("page_size", P))

    run(table)  # the valid table passes (its -1 padding is past every row's pages)
    bad = table.copy()
    bad[0, 2] = len(_pool)  # row 0 reads 3 pages
    with pytest.raises(ValueError, match=r"block_table: expected page ids in \[0, \d+\) in the "
                                         r"3 entries row 0 reads, got \d+ at \[0, 2\]"):
        run(bad)
    bad = table.copy()
    bad[2, 0] = -1
    with pytest.raises(ValueError, match=r"got -1 at \[2, 0\]"):
        run(bad)
    with pytest.raises(TypeError, match=r"block_table: expected dtype int32, got int64"):
        run(table.astype(np.int64))
    with pytest.raises(ValueError, match=r"block_table: expected shape \(3, "):
        run(table[:2])
    with pytest.raises(ValueError, match=r"quantized_len: expected a multiple of 32 in \[0, "
                                         r"max_blocks \* page_size = 64\]"):
        run(np.ascontiguousarray(table[:, :1]))
    with pytest.raises(ValueError, match=r"page_size 48 is not a positive multiple of 32"):
        run(table, page_size=48)
    twice = np.zeros((2 * len(_pool), _pool.shape[1]), np.uint8)
    other = page_layout(cfg, P, H, D).views(twice)["norms"][::2]  # twice the page stride
    with pytest.raises(ValueError, match=r"norms: expected the page stride of k_codes"):
        run(table, arrays={"norms": other})


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, p, residual_blocks", [(1, 128, "on"), (1, 64, "off"),
                                                       (4, 128, "on"), (16, 128, "on")])
def test_gpu_paged_kernel_equals_contiguous_at_llama_shapes(q_len, p, residual_blocks,
                                                            monkeypatch):
    """Llama-3.1-8B layer shapes (8 KV heads, D = 128, GQA 4, R = 128), float16: four rows of
    different lengths (one shares row 0's first page), shuffled pages in a poisoned pool, -1
    padding: the paged kernel equals the contiguous v3 kernel bit for bit at the same split
    plan (q_len 4: 16 rows, row groups; q_len 16: 64 rows, 2 row blocks of 32; residual
    blocks on, or the merge kernel scoring the residual), and the reference within 2 % of max
    |v|."""
    monkeypatch.setattr(K, "RESIDUAL_BLOCKS", residual_blocks)
    cfg = oscar.OScaRConfig()
    h, d, g = 8, 128, 4
    lens = (3000, 700, 129, 4200)
    cache, pool, views, table, lengths = _state(cfg, lens, seed=11, h=h, d=d, p=p)
    assert table[1, 0] == table[0, 0]
    bound = int(lengths[:, K.LEN_QUANTIZED].max())
    rng = np.random.default_rng(12)
    q = (0.3 * rng.standard_normal((len(lens), h * g, q_len, d))).astype(np.float32)
    for num_splits in (1, 7):
        want, want_lse = _run(cfg, q, _contiguous(cache, cfg, -(-bound // p) * p), cache,
                              lengths, bound, num_splits, q_dtype="float16")
        got, got_lse = _run(cfg, q, views, cache, lengths, bound, num_splits, table, pool, p=p,
                            q_dtype="float16")
        assert np.array_equal(got, want) and np.array_equal(got_lse, want_lse)
        assert np.isfinite(got.astype(np.float32)).all()
    kr, vr = cache.residual()
    ref_out, ref_lse = ref_decode(q.astype(np.float16).astype(np.float32), cache.packed(), kr,
                                  vr, cfg, return_lse=True, seq_lens=cache.seq_lens)
    vmax = np.abs(vr).max()
    np.testing.assert_allclose(got.astype(np.float32), ref_out, rtol=0, atol=0.02 * vmax)
    np.testing.assert_allclose(got_lse, ref_lse, rtol=0, atol=0.02)
