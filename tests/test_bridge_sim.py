"""The CUDA bridge's length bookkeeping (oscar/_cuda_bridge.py NumbaStore), run on CPU.

NumbaStore normally holds torch CUDA tensors; here it holds CPU torch tensors, and the few CUDA
entry points it touches are replaced for the test (test-only shims, below): Numba views of the
tensors are the simulator's arrays over the same memory (``t.numpy()``), launches go to the
simulator on stream 0, launch plans are off (the simulator has none: the dispatcher path). What
this checks is the bridge's own logic, which the GPU tests check again on a device: host mirror
and device lengths in step, device appends (append_rows + row flush) versus host-path appends,
variable-length rows, reset / refill, per-row starts, the capture mode's capacity-bound plans
and ``sync_lengths``; every result against the reference backend (packed bytes bit for bit,
decode outputs within 2 % of max |v|, lse within 0.02, as tests/test_kernels_varlen.py).
Tiny shapes (simulator): 2 rows, 1 KV head, head_dim 64, R = 32.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import oscar
from oscar.cache import QuantizedKVCache, _token_axis
from oscar.kernels_numba._compat import SIMULATOR

pytestmark = [pytest.mark.sim, pytest.mark.skipif(not SIMULATOR, reason="simulator shims")]

R = 32
CFG = oscar.OScaRConfig(residual_length=R)
B, H, G, D = 2, 1, 2, 64


@pytest.fixture()
def bridge(monkeypatch):
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from oscar import _cuda_bridge as br

    def as_array(t):
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return FakeCUDAArray(t.numpy())

    class Cuda:  # the simulator's cuda module, with as_cuda_array over CPU tensors
        def __getattr__(self, name):
            return getattr(br.cuda.__wrapped__, name)

    proxy = Cuda()
    proxy.as_cuda_array = as_array
    Cuda.__wrapped__ = br.cuda
    monkeypatch.setattr(br, "cuda", proxy)
    monkeypatch.setattr(br, "_nb", as_array)

    class _NoLaunch:
        def __init__(self, device):
            pass

        def __enter__(self):
            return 0

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(br, "_Launch", _NoLaunch)

    class _Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(br.NumbaStore, "check_device", lambda self, name, x: None)
    return br


def _store_cache(br, batch=B, capacity=64):
    store = br.NumbaStore(batch, H, D, "float32", CFG, torch.device("cpu"), capacity=capacity)
    return QuantizedKVCache(store, batch, H, D, "float32", CFG, device="cpu")


def _kv(n, seed, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, n, D, generator=g), torch.randn(batch, H, n, D, generator=g)


def _same(cache, ref):
    np.testing.assert_array_equal(cache.seq_lens, ref.seq_lens)
    lengths = cache._store.lengths.numpy()
    r = CFG.residual_length
    np.testing.assert_array_equal(lengths[:, 1], ref.seq_lens // r * r)
    np.testing.assert_array_equal(lengths[:, 2], ref.seq_lens % r)
    got, want = cache.packed().arrays(), ref.packed().arrays()
    for name in want:
        g = got[name].numpy()
        g = g.view(np.uint32) if g.dtype == np.int32 else g
        for b in range(cache.batch):
            n = _token_axis(name, int(ref.quantized_lens[b]), CFG)
            np.testing.assert_array_equal(g[b, :, :n], want[name][b, :, :n], err_msg=name)
    (gk, _), (rk, _) = cache.residual(), ref.residual()
    for b in range(cache.batch):
        n = int(ref.residual_lens[b])
        np.testing.assert_array_equal(gk[b, :, :n].numpy(), rk[b, :, :n])


def _decode_close(cache, ref, start=None):
    q = torch.randn(cache.batch, H * G, 1, D, generator=torch.Generator().manual_seed(9)) * 0.2
    cache._store.set_start(None if start is None else np.asarray(start))
    out, lse = cache._store.decode_attention(q, 1.0 / np.sqrt(D), True)
    want, wlse = oscar.decode_attention(q, ref, return_lse=True, start=start)
    vmax = float(np.abs(ref.residual()[1]).max())
    for b in range(cache.batch):
        if ref.seq_lens[b] == 0:
            assert torch.all(out[b] == 0)
            continue
        np.testing.assert_allclose(out[b].numpy(), want[b].numpy(), atol=0.02 * vmax, rtol=0)
        np.testing.assert_allclose(lse[b].numpy(), wlse[b].numpy(), atol=0.02, rtol=0)


def test_bridge_varlen_appends_reset_refill_and_start(bridge):
    cache = _store_cache(bridge)
    ref = oscar.QuantizedKVCache.empty(B, H, D, "float32", CFG)
    k, v = _kv(29, 1, batch=1)
    for c in (cache, ref):  # rows of different lengths: row 0 29 tokens, row 1 3 (host path)
        c.fill_row(0, k, v)
        c.fill_row(1, k[:, :, :3], v[:, :, :3])
    _same(cache, ref)
    kn, vn = _kv(5, 2)
    for t in range(5):  # device appends: row 0 flushes at step 2
        cache.append(kn[:, :, t : t + 1], vn[:, :, t : t + 1])
        ref.append(kn[:, :, t : t + 1], vn[:, :, t : t + 1])
    _same(cache, ref)
    _decode_close(cache, ref, start=[4, 1])
    _decode_close(cache, ref)
    for c in (cache, ref):
        c.reset_rows([0])
    _same(cache, ref)
    _decode_close(cache, ref)  # an empty row: zeros
    k2, v2 = _kv(33, 3, batch=1)
    for c in (cache, ref):
        c.fill_row(0, k2, v2)
    kn, vn = _kv(2, 4)
    for c in (cache, ref):  # a two-token append: the host path, row by row
        c.append(kn, vn)
    _same(cache, ref)


def test_bridge_capture_mode_decides_on_the_device(bridge):
    cache = _store_cache(bridge)
    k, v = _kv(30, 5)
    cache.append(k, v)
    ref = oscar.quantize_kv(k.numpy(), v.numpy(), CFG)
    with pytest.raises(ValueError, match="num_q_heads"):
        cache.prepare_capture(64, num_q_heads=0)
    with pytest.raises(ValueError, match="q_lens"):
        cache.prepare_capture(64, num_q_heads=H * G, q_lens=(0,))
    with pytest.raises(ValueError, match="q_lens"):
        cache.prepare_capture(64, num_q_heads=H * G, q_lens=1.5)
    with pytest.raises(ValueError, match="q_len 500 is too many"):  # and nothing changed
        cache.prepare_capture(64, num_q_heads=H * G, q_lens=(500,))
    assert not cache._store.static
    cache.prepare_capture(64, num_q_heads=H * G, q_lens=(1, 2))
    store = cache._store
    assert store.static and store._bounds() == (64, R - 1)
    # the decode workspaces of both query shapes exist before any capture (a capture must not
    # allocate buffers the cache keeps); a decode of those shapes adds none
    assert len(store._dec_cache) == 2
    built = dict(store._dec_cache)
    kn, vn = _kv(4, 6)
    for t in range(4):
        cache.append(kn[:, :, t : t + 1], vn[:, :, t : t + 1])
        ref.append(kn[:, :, t : t + 1].numpy(), vn[:, :, t : t + 1].numpy())
    assert store.seq_lens.tolist() == [30, 30]  # the host mirror is left alone
    np.testing.assert_array_equal(cache.seq_lens, ref.seq_lens)  # read from the device
    with pytest.raises(ValueError, match="one token per row"):
        cache.append(kn[:, :, :2], vn[:, :, :2])
    with pytest.raises(ValueError, match="sync_lengths"):
        cache.reset_rows([0])
    _decode_close(cache, ref)  # a capacity-bound plan, the rows' lengths read on the device
    assert all(store._dec_cache[k] is built[k] for k in built) and len(store._dec_cache) == 2
    np.testing.assert_array_equal(cache.sync_lengths(), ref.seq_lens)
    assert not store.static
    _same(cache, ref)


def test_head_groups_at_the_kernels_real_limits():
    from oscar.kernels_numba import attention as K

    cfg = oscar.OScaRConfig()
    assert K.head_groups(cfg, 128, 4, 1) == 1 and K.head_groups(cfg, 128, 8, 4) == 1
    # v3 takes up to 256 rows in one launch (row blocks of up to 32 rows)
    assert K.head_groups(cfg, 128, 8, 8) == 1 and K.head_groups(cfg, 128, 8, 32) == 1
    assert K.head_groups(cfg, 128, 1, 300) is None  # q_len alone is too many rows
    # v1 (float32 params): at most 32 rows at head_dim 128, beyond that head groups
    f32 = oscar.OScaRConfig(param_dtype="float32")
    assert K.head_groups(f32, 128, 8, 8) == 2  # 64 rows (GQA 8 at q_len 8) -> 2 x 32
    assert K.head_groups(f32, 128, 4, 16) == 2  # 64 rows (GQA 4 at q_len 16)
    assert K.head_groups(f32, 128, 8, 32) == 8  # one query head per launch: 32 rows
    assert K.head_groups(f32, 128, 1, 37) is None


def test_bridge_more_rows_than_a_block_holds_run_in_row_blocks(bridge, monkeypatch):
    # A v3 block's rows lowered to 4 so that the simulator stays quick: G 4 x q_len 2 = 8 rows
    # run in one launch of 2 row blocks (not in head groups); out and lse equal the reference's.
    from oscar.kernels_numba import attention as K

    monkeypatch.setattr(K._split_v3, "ROWS_MAX", 4)
    cache = _store_cache(bridge)
    k, v = _kv(40, 11)
    cache.append(k, v)
    ref = oscar.quantize_kv(k.numpy(), v.numpy(), CFG)
    store = cache._store
    assert store._head_groups(4, 2) == 1
    key = K._split_key(CFG, D, 4, 2, "float32", "float32")  # 1 KV head, 4 query heads
    assert K.row_blocks(key) == 2
    _step_equals_reference(store, ref, seed=13)


def _step_equals_reference(store, ref, seed):
    """A 4-head q_len-2 decode step of ``store`` equals the reference cache's (out and lse);
    returns the step's (q, out)."""
    q = torch.randn(B, 4, 2, D, generator=torch.Generator().manual_seed(seed)) * 0.2
    out, lse = store.decode_attention(q, 1.0 / np.sqrt(D), True)
    want, wlse = oscar.decode_attention(q, ref, return_lse=True)
    vmax = float(np.abs(ref.residual()[1]).max())
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=0.02 * vmax, rtol=0)
    np.testing.assert_allclose(lse.numpy(), wlse.numpy(), atol=0.02, rtol=0)
    return q, out


def test_bridge_more_rows_than_a_kernel_takes_run_in_head_groups(bridge, monkeypatch):
    # The kernels' limits, lowered so that the simulator stays quick: a kernel takes at most 4
    # rows per KV head, so G 4 x q_len 2 = 8 rows runs as 2 launches of 2 query heads each;
    # the step must equal the reference (out and lse), in the original head order.
    from oscar.kernels_numba import attention as K

    real = K.rows_fit
    monkeypatch.setattr(K, "rows_fit", lambda c, d, g, lq: g * lq <= 4 and real(c, d, g, lq))
    cache = _store_cache(bridge)
    k, v = _kv(40, 11)
    cache.append(k, v)
    ref = oscar.quantize_kv(k.numpy(), v.numpy(), CFG)
    store = cache._store
    assert store._head_groups(4, 2) == 2 and store._head_groups(4, 1) == 1
    q, out = _step_equals_reference(store, ref, seed=12)
    assert torch.equal(store.decode_attention(q, 1.0 / np.sqrt(D), False), out)
    with pytest.raises(ValueError, match="q_len 5 is too many"):  # 5 rows even per head
        store.decode_attention(torch.zeros(B, 4, 5, D), 0.1, False)
