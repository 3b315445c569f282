"""Issue 25 on the GPU: variable-length rows, per-row starts, continuous batching, and a whole
decode step (N layers' append + decode_attention) captured in one CUDA graph.

All ``gpu``-marked (skipped without a CUDA GPU). What each test pins down:

* CUDA rows of different lengths (prefill with ``seq_lens``, then 300 one-token appends that cross
  each row's own flushes): packed bytes of each row's valid prefix and its residual tokens equal
  the reference's bit for bit; decode (with per-row starts) equals the reference within the
  tolerance of tests/test_integration_gpu.py (float16/bfloat16 outputs, 2e-2).
* Continuous batching on CUDA: ``reset_rows`` + ``fill_row`` equal the reference.
* Whole-step capture: a ``torch.cuda.CUDAGraph`` of N layers' append + decode for one token,
  replayed 300 times (crossing flushes) on rows of different lengths, gives outputs and packed
  bytes equal to the same loop run eagerly in the same mode (``prepare_capture``) bit for bit.
* ``torch.compile(mode="reduce-overhead")`` of the same step through the custom ops: equal to
  eager bit for bit, no graph break, and the CUDA graph not skipped.
* The capacity contract: a row that reaches its reserved capacity inside the captured loop takes
  no token, and ``cache.check()`` raises.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import oscar  # noqa: E402
from helpers_reference import host_array  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::FutureWarning")]

CFG = oscar.OScaRConfig()  # R = 128: 300 tokens cross two or three flushes per row
B, H, G, D = 3, 2, 4, 128
LENS = (200, 57, 383)  # rows at different offsets in their windows
STEPS = 300
LAYERS = 4


_host = host_array


def _token_axis(name, tokens):
    from oscar.cache import _token_axis

    return _token_axis(name, tokens, CFG)


def _same_rows(cuda_cache, ref_cache):
    """Every row's valid packed prefix and residual tokens equal, bit for bit."""
    lens = ref_cache.seq_lens
    np.testing.assert_array_equal(cuda_cache.seq_lens, lens)
    g, r = cuda_cache.packed().arrays(), ref_cache.packed().arrays()
    for name in r:
        gh = _host(g[name])
        for b in range(len(lens)):
            n = _token_axis(name, int(lens[b] // 128 * 128))
            assert np.array_equal(gh[b, :, :n], r[name][b, :, :n]), (name, b)
    (gk, gv), (rk, rv) = cuda_cache.residual(), ref_cache.residual()
    for b in range(len(lens)):
        n = int(lens[b] % 128)
        assert np.array_equal(_host(gk[b, :, :n]).astype(np.float32), rk[b, :, :n])
        assert np.array_equal(_host(gv[b, :, :n]).astype(np.float32), rv[b, :, :n])


def _kv(n, seed, batch=B):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, H, n, D, generator=g).to(torch.bfloat16)
    v = torch.randn(batch, H, n, D, generator=g).to(torch.bfloat16)
    return k, v


def test_cuda_rows_of_different_lengths_equal_the_reference():
    k, v = _kv(max(LENS), 1)
    c = oscar.quantize_kv(k.cuda(), v.cuda(), CFG, seq_lens=list(LENS), num_q_heads=H * G)
    r = oscar.quantize_kv(k, v, CFG, seq_lens=list(LENS))
    _same_rows(c, r)
    kn, vn = _kv(STEPS, 2)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    start = [5, 0, 130]
    for t in range(STEPS):
        c.append(kn[:, :, t : t + 1].cuda(), vn[:, :, t : t + 1].cuda())
        r.append(kn[:, :, t : t + 1], vn[:, :, t : t + 1])
        if t % 97 == 0 or t == STEPS - 1:
            for st in (None, start):
                got = oscar.decode_attention(q.cuda(), c, start=st).float().cpu()
                want = oscar.decode_attention(q, r, start=st).float()
                torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    _same_rows(c, r)
    c.check()


def test_cuda_continuous_batching_equals_the_reference():
    k, v = _kv(max(LENS), 4)
    c = oscar.quantize_kv(k.cuda(), v.cuda(), CFG, seq_lens=list(LENS))
    r = oscar.quantize_kv(k, v, CFG, seq_lens=list(LENS))
    for cache in (c, r):
        cache.reset_rows([1])
    k2, v2 = _kv(170, 5, batch=1)
    c.fill_row(1, k2.cuda(), v2.cuda())
    r.fill_row(1, k2, v2)
    kn, vn = _kv(40, 6)
    for t in range(40):
        c.append(kn[:, :, t : t + 1].cuda(), vn[:, :, t : t + 1].cuda())
        r.append(kn[:, :, t : t + 1], vn[:, :, t : t + 1])
    _same_rows(c, r)
    q = torch.randn(B, H * G, 1, D).to(torch.bfloat16)
    torch.testing.assert_close(oscar.decode_attention(q.cuda(), c).float().cpu(),
                               oscar.decode_attention(q, r).float(), atol=2e-2, rtol=2e-2)


def _layers(seed):
    """LAYERS caches of rows of different lengths, prepared for capture."""
    caches = []
    for layer in range(LAYERS):
        k, v = _kv(max(LENS), seed + layer)
        cache = oscar.quantize_kv(k.cuda(), v.cuda(), CFG, seq_lens=list(LENS),
                                  num_q_heads=H * G)
        caches.append(cache.prepare_capture(max(LENS) + STEPS + 128))
    return caches


def _inputs(t, layer):
    g = torch.Generator().manual_seed(10_000 + 31 * t + layer)
    k = torch.randn(B, H, 1, D, generator=g).to(torch.bfloat16)
    v = torch.randn(B, H, 1, D, generator=g).to(torch.bfloat16)
    q = torch.randn(B, H * G, 1, D, generator=g).to(torch.bfloat16)
    return k.cuda(), v.cuda(), q.cuda()


def _step(caches, ins):
    return [oscar.decode_attention(q, c.append(k, v)) for c, (k, v, q) in zip(caches, ins)]


def test_whole_step_cuda_graph_replay_equals_eager_bit_for_bit():
    eager, graphed = _layers(20), _layers(20)
    # eager reference: the same mode (device lengths, capacity-bound plans), no graph
    eager_out = []
    for t in range(STEPS):
        eager_out.append([o.clone() for o in _step(eager, [_inputs(t, i) for i in range(LAYERS)])])
    # graph: step 0 eagerly (compiles and builds every launch plan), then capture one step and
    # replay it for steps 1.. with the inputs copied into its static buffers
    first = _step(graphed, [_inputs(0, i) for i in range(LAYERS)])
    for a, b in zip(first, eager_out[0]):
        assert torch.equal(a, b)
    static_in = [tuple(x.clone() for x in _inputs(1, i)) for i in range(LAYERS)]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(graphed, static_in)
    for t in range(1, STEPS):
        for buf, new in zip(static_in, (_inputs(t, i) for i in range(LAYERS))):
            for x, y in zip(buf, new):
                x.copy_(y)
        graph.replay()
        for layer in range(LAYERS):
            assert torch.equal(static_out[layer], eager_out[t][layer]), (t, layer)
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager):
        np.testing.assert_array_equal(a.sync_lengths(), np.asarray(LENS) + STEPS)
        np.testing.assert_array_equal(b.sync_lengths(), np.asarray(LENS) + STEPS)
        for name, x in a.packed().arrays().items():
            assert torch.equal(x, b.packed().arrays()[name]), name
        for x, y in zip(a.residual(), b.residual()):
            assert torch.equal(x, y)
        a.check()


def test_torch_compile_reduce_overhead_equals_eager():
    from torch._dynamo.utils import counters

    from oscar.integrations import torch_ops

    eager, compiled_caches = _layers(40), _layers(40)
    for c in compiled_caches:
        torch_ops.prepare(c)

    def step(caches, ins):
        outs = []
        for c, (k, v, q) in zip(caches, ins):
            torch_ops.append(c, k, v)
            outs.append(torch_ops.decode_attention(q, c))
        return outs

    counters.clear()
    fn = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for t in range(STEPS):
        ins = [_inputs(t, i) for i in range(LAYERS)]
        want = _step(eager, ins)
        got = fn(compiled_caches, ins)
        for a, b in zip(got, want):
            assert torch.equal(a, b), t
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    for a, b in zip(compiled_caches, eager):
        np.testing.assert_array_equal(a.sync_lengths(), b.sync_lengths())


def test_opcheck_on_cuda():
    from oscar.integrations import torch_ops

    k, v = _kv(max(LENS), 50)
    c = torch_ops.prepare(oscar.quantize_kv(k.cuda(), v.cuda(), CFG, seq_lens=list(LENS)))
    q = torch.randn(B, H * G, 1, D, device="cuda").to(torch.bfloat16)
    torch.library.opcheck(torch.ops.oscar.decode_attention.default,
                          (q, torch_ops.lengths_tensor(c), c._op_id, 0.1))


def test_capacity_overflow_inside_the_loop_is_flagged_not_written():
    k, v = _kv(130, 60)
    c = oscar.quantize_kv(k.cuda(), v.cuda(), CFG, max_seq_len=256).prepare_capture(256)
    assert c._store.capacity == 256
    kn, vn = _kv(400, 61)
    for t in range(400):  # room for 256 packed + 127 residual: the rest is dropped
        c.append(kn[:, :, t : t + 1].cuda(), vn[:, :, t : t + 1].cuda())
    with pytest.raises(ValueError, match="capacity"):
        c.check()
    np.testing.assert_array_equal(c.sync_lengths(), [256 + 127] * B)
    r = oscar.quantize_kv(torch.cat((k, kn), 2)[:, :, : 256 + 127],
                          torch.cat((v, vn), 2)[:, :, : 256 + 127], CFG)
    _same_rows(c, r)
