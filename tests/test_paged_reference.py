"""The paged cache on the reference backend (oscar.PagedKVCache, reference/paged.py).

Exact: the pages of a sequence, gathered through its block table, are the contiguous cache's
packed bytes on the same tokens; residual windows and decode outputs (and lse) are bit for bit
the contiguous cache's. Driven like an engine: random page ids from the pool, sequences of
different lengths written interleaved in one call with padding slots, prefix pages shared between
sequences, pages freed and reused. Errors: ValueError/TypeError naming the argument, nothing
changed.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oscar
from oscar.paged import PagedKVCache, slot_mapping
from oscar.reference.attention import decode_attention as ref_decode
from oscar.reference.block import quantize_block

from helpers_reference import make_kv, make_q

#: (config kwargs, num_kv_heads, head_dim, page sizes to try): R and P small so that a few
#: hundred tokens cross several windows and pages.
CASES = {
    "default_r64": (dict(residual_length=64), 2, 32, (32, 64, 128)),
    "head_scope_kg64_int4": (dict(residual_length=64, key_group_size=64, norm_scope="head",
                                  key_bits=4, value_group_size=16), 2, 32, (64, 128)),
    "kivi_fp32_params": (dict(residual_length=32, rotate_keys=False, scale_tokens=False,
                              rotate_values=False, param_dtype="float32"), 1, 64, (32, 96)),
}


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_packed_equal(pa, pb):
    a, b = pa.arrays(), pb.arrays()
    assert a.keys() == b.keys()
    for name in a:
        assert same_bytes(a[name], b[name]), name


class Engine:
    """A toy serving loop: sequence slots, block tables grown page by page, writes by slot."""

    def __init__(self, cache, max_blocks, rng):
        self.cache, self.rng = cache, rng
        self.tables = np.full((cache.max_seqs, max_blocks), -1, np.int32)
        self.nblocks = np.zeros(cache.max_seqs, np.int64)

    def start(self, s, shared_pages=()):
        shared = np.asarray(shared_pages, np.int32)
        if len(shared):
            self.cache.retain(shared)
        self.tables[s] = -1
        self.tables[s, : len(shared)] = shared
        self.nblocks[s] = len(shared)
        self.cache.reset(s, cached_len=len(shared) * self.cache.page_size)

    def slots(self, s, n):
        """Slots of the next ``n`` tokens of sequence ``s`` (allocating pages as needed)."""
        p = self.cache.page_size
        first = self.cache.seq_len(s)
        need = -(-(first + n) // p)
        if need > self.nblocks[s]:
            new = self.cache.allocate(int(need - self.nblocks[s]))
            self.tables[s, self.nblocks[s] : need] = new
            self.nblocks[s] = need
        return slot_mapping(self.tables[s], np.arange(first, first + n), p)

    def step(self, chunks, pad=0):
        """One write of ``{seq: (k [H, n, D], v)}``, tokens interleaved across sequences (each
        sequence's in order), plus ``pad`` padding tokens."""
        order, ks, vs, slots, seqs = [], [], [], [], []
        for s, (k, v) in chunks.items():
            sl = self.slots(s, k.shape[1])
            for j in range(k.shape[1]):
                order.append((s, j))
                ks.append(k[:, j])
                vs.append(v[:, j])
                slots.append(sl[j])
                seqs.append(s)
        h, d = self.cache.num_kv_heads, self.cache.head_dim
        for _ in range(pad):
            ks.append(np.full((h, d), 7.0, np.float32))
            vs.append(np.full((h, d), 7.0, np.float32))
            slots.append(-1)
            seqs.append(0)
        # interleave: a random merge that keeps each sequence's order
        keys = self.rng.random(len(slots))
        perm = np.argsort(keys, kind="stable")
        by_seq = {}
        for i in perm:
            by_seq.setdefault(seqs[i], []).append(i)
        fixed = perm.copy()
        for s, idx in by_seq.items():
            fixed[np.isin(perm, idx)] = sorted(idx)
        k_all = np.stack(ks)[fixed].astype(self.cache.dtype)
        v_all = np.stack(vs)[fixed].astype(self.cache.dtype)
        self.cache.write(k_all, v_all, np.asarray(slots, np.int64)[fixed],
                         np.asarray(seqs, np.int32)[fixed])


def contiguous(cfg, k, v):
    return oscar.quantize_kv(k, v, cfg)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_paged_equals_contiguous(data):
    """Random lengths, chunkings, page sizes and page ids: packed bytes, residual and decode of
    every sequence equal the contiguous cache's on its tokens, bit for bit."""
    case = data.draw(st.sampled_from(sorted(CASES)), label="case")
    kw, h, d, page_sizes = CASES[case]
    cfg = oscar.OScaRConfig(**kw)
    p = data.draw(st.sampled_from(page_sizes), label="page_size")
    dtype = data.draw(st.sampled_from(["float32", "float16"]), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    nseq = 3
    lengths = [data.draw(st.integers(1, 3 * cfg.residual_length + 5), label=f"len{s}")
               for s in range(nseq)]
    pool = sum(-(-n // p) for n in lengths) + 3
    cache = PagedKVCache.empty(pool, p, h, d, max_seqs=nseq + 1, dtype=dtype, config=cfg)
    junk = cache.allocate(3)  # so that sequences do not get pages 0, 1, 2, ...
    eng = Engine(cache, max_blocks=pool, rng=rng)
    kv = {}
    for s in range(nseq):
        k, v = make_kv(1, h, lengths[s], d, seed=int(rng.integers(1 << 30)), dtype=dtype)
        kv[s] = (k, v)
        eng.start(s + 1)
    cache.free(junk)  # freed pages are reused by later allocations
    done = [0] * nseq
    while any(done[s] < lengths[s] for s in range(nseq)):
        chunks = {}
        for s in range(nseq):
            if done[s] < lengths[s]:
                n = int(min(lengths[s] - done[s], rng.choice([1, 2, 5, cfg.residual_length + 3])))
                k, v = kv[s]
                chunks[s + 1] = (k[0, :, done[s] : done[s] + n], v[0, :, done[s] : done[s] + n])
                done[s] += n
        eng.step(chunks, pad=int(rng.integers(0, 3)))
    q_len = data.draw(st.sampled_from([1, 2]), label="q_len")
    q = make_q(nseq, 2 * h, q_len, d, seed=5).astype(dtype)
    rows = [s + 1 for s in range(nseq)]
    q_len = min(q_len, min(lengths))
    q = q[:, :, :q_len]
    out, lse = cache.decode_attention(q, eng.tables[rows], seq_ids=rows, return_lse=True)
    for s in range(nseq):
        ref = contiguous(cfg, *kv[s])
        assert cache.seq_len(s + 1) == ref.seq_len
        assert cache.quantized_len(s + 1) == ref.quantized_len
        assert_packed_equal(cache.packed(eng.tables[s + 1], s + 1), ref.packed())
        for a, b in zip(cache.residual(s + 1), ref.residual()):
            assert same_bytes(a, b)
        o, l_ = oscar.decode_attention(q[s : s + 1], ref, return_lse=True)
        assert same_bytes(out[s : s + 1], o) and same_bytes(lse[s : s + 1], l_)


def _prefix_setup(p=64, r=64, prefix_pages=2, seed=0):
    cfg = oscar.OScaRConfig(residual_length=r)
    h, d = 2, 32
    cache = PagedKVCache.empty(12, p, h, d, max_seqs=3, config=cfg)
    eng = Engine(cache, max_blocks=8, rng=np.random.default_rng(seed))
    k, v = make_kv(1, h, 300, d, seed=seed)
    eng.start(0)
    eng.step({0: (k[0, :, :200], v[0, :, :200])})
    return cfg, cache, eng, k, v


def test_prefix_sharing_and_page_reuse():
    """B shares A's first two full pages; A is freed and C reuses A's own pages: B and C still
    decode exactly as contiguous caches of their tokens."""
    cfg, cache, eng, k, v = _prefix_setup()
    p = cache.page_size
    shared = eng.tables[0, :2].copy()
    kb, vb = make_kv(1, 2, 150, 32, seed=9)
    kb[:, :, : 2 * p], vb[:, :, : 2 * p] = k[:, :, : 2 * p], v[:, :, : 2 * p]  # same prefix
    eng.start(1, shared_pages=shared)
    assert cache.refcount(int(shared[0])) == 2 and cache.seq_len(1) == 2 * p
    eng.step({1: (kb[0, :, 2 * p :], vb[0, :, 2 * p :])})
    a_own = eng.tables[0, 2 : eng.nblocks[0]].copy()
    free_before = cache.num_free_pages
    cache.free(eng.tables[0, : eng.nblocks[0]])  # A ends: its own pages return, shared stay
    assert cache.num_free_pages == free_before + len(a_own)
    assert cache.refcount(int(shared[0])) == 1
    kc, vc = make_kv(1, 2, 190, 32, seed=11)
    eng.start(0)
    eng.nblocks[0] = 0
    eng.step({0: (kc[0, :, :100], vc[0, :, :100])})
    assert set(eng.tables[0, : eng.nblocks[0]]) <= set(a_own)  # reused
    eng.step({0: (kc[0, :, 100:], vc[0, :, 100:])})
    q = make_q(2, 4, 1, 32, seed=3)
    out = cache.decode_attention(q, eng.tables[[1, 0]], seq_ids=[1, 0])
    for i, (kk, vv, s) in enumerate(((kb, vb, 1), (kc, vc, 0))):
        ref = contiguous(cfg, kk, vv)
        assert_packed_equal(cache.packed(eng.tables[s], s), ref.packed())
        assert same_bytes(out[i : i + 1], oscar.decode_attention(q[i : i + 1], ref))


def test_prefix_not_a_window_multiple():
    """A shared prefix of one page (P = 32 < R = 64): the sharer's windows start after it. Its
    quantized bytes are still the contiguous quantizer's on the same tokens (key groups are
    aligned to absolute positions), and decode equals the reference over (pages, residual)."""
    cfg, cache, eng, k, v = _prefix_setup(p=32, r=64)
    eng.start(1, shared_pages=eng.tables[0, :1])
    eng.step({1: (k[0, :, 32:130], v[0, :, 32:130])})
    assert cache.quantized_len(1) == 96 and cache.residual_len(1) == 34
    block = quantize_block(k[:, :, :96], v[:, :, :96], cfg)
    assert_packed_equal(cache.packed(eng.tables[1], 1), block)
    q = make_q(1, 2, 2, 32, seed=4)
    k_res, v_res = cache.residual(1)
    assert same_bytes(k_res, k[:, :, 96:130])
    want = ref_decode(q, block, k_res, v_res, cfg).astype(np.float32)
    assert same_bytes(cache.decode_attention(q, eng.tables[[1]], seq_ids=[1]), want)


def test_torch_cpu_inputs_and_layout_bytes():
    """CPU torch tensors in, torch out; the page layout's bytes are the format's per token."""
    cfg = oscar.OScaRConfig(residual_length=32)
    cache = PagedKVCache.empty(4, 32, 2, 32, max_seqs=1, dtype="bfloat16", config=cfg)
    pages = cache.allocate(2)
    cache.reset(0)
    k = torch.randn(40, 2, 32, dtype=torch.bfloat16)
    cache.write(k, -k, slot_mapping(pages, np.arange(40), 32), np.zeros(40, np.int32))
    out = cache.decode_attention(torch.randn(1, 4, 1, 32, dtype=torch.bfloat16), pages[None])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    # default config: 772 bytes per token per layer at H=8, D=128 (docs/format.md section 5)
    big = oscar.reference.paged.page_layout(oscar.OScaRConfig(), 64, 8, 128)
    assert big.page_bytes == 64 * 772


# --- errors: named argument, nothing changed ---------------------------------------------------


def _snapshot(cache):
    st_ = cache._store
    return (st_.pool.tobytes(), st_.k_res.tobytes(), st_.v_res.tobytes(),
            cache._quantized.copy(), cache._residual.copy(), cache._res_slots.copy(),
            cache._refcount.copy(), list(cache._free), cache._owner.copy())


def _same(a, b):
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
               for x, y in zip(a, b))


def test_pool_exhaustion_is_an_error_at_allocation():
    cache = PagedKVCache.empty(3, 32, 1, 32, max_seqs=1, config=oscar.OScaRConfig(
        residual_length=32))
    cache.allocate(2)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match=r"n: the page pool is exhausted: requested 2 pages, "
                                         r"1 of 3 free"):
        cache.allocate(2)
    assert _same(before, _snapshot(cache))


def _one_seq():
    cfg = oscar.OScaRConfig(residual_length=32)
    cache = PagedKVCache.empty(6, 32, 1, 32, max_seqs=2, config=cfg)
    pages = cache.allocate(2)
    cache.reset(0)
    k, v = make_kv(1, 1, 40, 32, seed=2)
    return cache, pages, k[0].transpose(1, 0, 2).copy(), v[0].transpose(1, 0, 2).copy()


@pytest.mark.parametrize("what, pattern", [
    ("offset", r"slot_mapping: expected the token at position 0 of sequence 0 at offset 0"),
    ("range", r"slot_mapping: expected -1 or a slot in \[0, num_pages \* page_size = 192\)"),
    ("free_page", r"slot_mapping: expected pages allocated to one sequence, got page 5 \(free\)"),
    ("shared_page", r"\(shared \(read-only\)\)"),
    ("split_page", r"slot_mapping: expected the tokens of one page run of sequence 0 in one page"),
    ("seq", r"seq_ids: expected sequence slots in \[0, 2\), got 2 at index 0"),
    ("two_seqs_one_page", r"slot_mapping: expected each page to hold one sequence's tokens, "
                          r"got page \d+ for position 0 of sequence 1"),
    ("shape", r"k: expected shape \[num_tokens, num_kv_heads, head_dim\] = \[40, 1, 32\]"),
    ("dtype", r"k: expected dtype float32 \(the cache's\), got float16"),
    ("nonfinite", r"k: expected finite values"),
    ("slots_dtype", r"slot_mapping: expected an integer dtype, got float64"),
    ("slots_len", r"slot_mapping: expected shape \[40\], got \(39,\)"),
])
def test_write_errors_change_nothing(what, pattern):
    cache, pages, k, v = _one_seq()
    cache.write(k[:3], v[:3], slot_mapping(pages, np.arange(3), 32), np.zeros(3, np.int32))
    cache.reset(0)
    before = _snapshot(cache)
    slots = slot_mapping(pages, np.arange(40), 32)
    seqs = np.zeros(40, np.int32)
    err = ValueError
    if what == "offset":
        slots = slots + 1
    elif what == "range":
        slots[5] = 6 * 32
    elif what == "free_page":
        slots[32:] = 5 * 32 + np.arange(8)
    elif what == "shared_page":
        cache.retain(pages[1:])
        before = _snapshot(cache)
    elif what == "split_page":
        other = cache.allocate(1)
        before = _snapshot(cache)
        slots[10:32] = other[0] * 32 + np.arange(10, 32)
    elif what == "seq":
        seqs[:] = 2
    elif what == "two_seqs_one_page":
        cache.reset(1)
        before = _snapshot(cache)
        seqs[32:] = 1  # sequence 1's first tokens
        slots[32:] = slot_mapping(pages, np.arange(8), 32)  # page 0: sequence 0 holds it
    elif what == "shape":
        k = k[:, :, :16]
    elif what == "dtype":
        k, err = k.astype(np.float16), TypeError
    elif what == "nonfinite":
        k = k.copy()
        k[33, 0, 3] = np.inf
    elif what == "slots_dtype":
        slots, err = slots.astype(np.float64), TypeError
    elif what == "slots_len":
        slots = slots[:39]
    with pytest.raises(err, match=pattern):
        cache.write(k, v, slots, seqs)
    assert _same(before, _snapshot(cache))


def test_padding_slots_are_skipped():
    cache, pages, k, v = _one_seq()
    slots = slot_mapping(pages, np.arange(40), 32)
    slots_pad = np.concatenate(([-1], slots[:20], [-1, -1], slots[20:]))
    kp = np.concatenate((k[:1] * 0 + 1e30, k[:20], k[:2], k[20:]))  # pad values never read
    vp = np.concatenate((v[:1], v[:20], v[:2], v[20:]))
    cache.write(kp, vp, slots_pad, np.zeros(43, np.int32))
    ref = oscar.quantize_kv(k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None],
                            cache.config)
    assert_packed_equal(cache.packed(pages, 0), ref.packed())


def test_decode_and_pool_errors():
    cache, pages, k, v = _one_seq()
    cache.write(k, v, slot_mapping(pages, np.arange(40), 32), np.zeros(40, np.int32))
    q = make_q(1, 2, 1, 32)
    bt = pages[None].astype(np.int32)
    with pytest.raises(TypeError, match=r"block_table: expected dtype int32, got int64"):
        cache.decode_attention(q, bt.astype(np.int64))
    with pytest.raises(ValueError, match=r"block_table: expected shape \[num_seqs = 1"):
        cache.decode_attention(q, bt[0])
    with pytest.raises(ValueError, match=r"block_table: expected allocated pages in \[0, 6\), "
                                         r"got 4 at \[0, 0\]"):
        cache.decode_attention(q, np.array([[4, 1]], np.int32))
    with pytest.raises(ValueError, match=r"q: expected 1 <= q_len <= seq_len of row 0"):
        cache.decode_attention(make_q(1, 2, 41, 32), bt)
    with pytest.raises(ValueError, match=r"q: expected shape \[num_seqs, a multiple of "):
        cache.decode_attention(make_q(1, 2, 1, 64), bt)
    with pytest.raises(ValueError, match=r"pages: expected allocated pages, got page 4"):
        cache.free([4])
    with pytest.raises(ValueError, match=r"pages: expected allocated pages, got free page 4"):
        cache.retain([4])
    with pytest.raises(ValueError, match=r"cached_len: expected a multiple of page_size \(32\)"):
        cache.reset(1, cached_len=16)
    with pytest.raises(ValueError, match=r"page_size: expected a multiple of 64"):
        PagedKVCache.empty(2, 32, 1, 32, 1, config=oscar.OScaRConfig(key_group_size=64))
    with pytest.raises(ValueError, match=r"num_pages: expected a positive int, got 0"):
        PagedKVCache.empty(0, 32, 1, 32, 1)
    with pytest.raises(ValueError, match=r"backend: expected 'reference' or 'numba'"):
        PagedKVCache.empty(1, 32, 1, 32, 1, backend="cuda")
    cache.free(pages)
    with pytest.raises(ValueError, match=r"block_table: expected allocated pages"):
        cache.decode_attention(q, bt)  # freed pages are not read


def test_engine_pool_is_used_in_place():
    """A caller's uint8 [num_pages, page_bytes] buffer (a serving engine's) holds the pages."""
    cfg = oscar.OScaRConfig(residual_length=32)
    layout = oscar.reference.paged.page_layout(cfg, 32, 1, 32)
    pool = np.full((3, layout.page_bytes), 0xAB, np.uint8)  # not zeroed: an engine's memory
    cache = PagedKVCache.empty(3, 32, 1, 32, max_seqs=1, config=cfg, pool=pool)
    pages = cache.allocate(2)[::-1].copy()
    k, v = make_kv(1, 1, 64, 32, seed=6)
    cache.reset(0)
    cache.write(k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2),
                slot_mapping(pages, np.arange(64), 32), np.zeros(64, np.int32))
    ref = oscar.quantize_kv(k, v, cfg)
    assert_packed_equal(cache.packed(pages, 0), ref.packed())
    views = layout.views(pool)  # the caller's own buffer holds the bytes
    assert same_bytes(views["k_codes"][pages[0]][None], ref.packed().k_codes[:, :, :1])
    assert (pool[2] == 0xAB).all()  # the page never allocated is untouched
    with pytest.raises(ValueError, match=r"pool: expected a C-contiguous uint8 array of shape "
                                         r"\[num_pages, page_bytes\] = \[3, \d+\], got uint8 "
                                         r"\(2, \d+\)"):
        PagedKVCache.empty(3, 32, 1, 32, max_seqs=1, config=cfg, pool=pool[:2])
    with pytest.raises(ValueError, match=r"got uint32"):
        PagedKVCache.empty(3, 32, 1, 32, max_seqs=1, config=cfg, pool=pool.view(np.uint32))
