"""The public API on CUDA torch tensors (Numba backend) against the reference backend.

GPU only (``gpu`` marker): the bridge passes torch CUDA tensors to the kernels through
``__cuda_array_interface__`` on torch's current stream, which the CUDA simulator cannot do.

Tolerances: packed bytes, params and norms must be *equal* (the kernels reproduce the reference's
float32 operation order). Attention outputs are fp32 accumulations compared with the reference's
float64 sums over the same dequantized values: relative error of order eps32 * sqrt(seq_len) per
term, so 1e-4 relative (of ||out||) is generous yet catches any indexing error, which shows up at
the percent level. Outputs in float16/bfloat16 add one rounding of the output dtype.

The default split kernel v3 runs both products on tensor cores with float16 operands (query
fragments, p * scale). The query fragment's rounding (2**-11 relative per channel) moves a logit
by up to 2**-11 sum_c |q_c s_c code_c|, which on random data is ~sqrt(head_dim) times the
logit's own scale: ~5e-3 of a logit at head_dim 128, and peaked attention passes that to the
output. Its outputs are therefore compared at F16_RTOL = 1e-2 relative (lse at 1e-2 relative
or absolute, whichever is larger):
still well below the error of a wrong index, head or mask (tens of percent).
tests/test_kernels_attention.py bounds the v3 error element by element.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import oscar  # noqa: E402
from oscar.reference import attention_dense  # noqa: E402

pytestmark = pytest.mark.gpu

DEV = "cuda"
TORCH_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OUT_RTOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
F16_RTOL = 1e-2


def _tol(base):
    """``base`` for the float32 split kernels, at least F16_RTOL with the tensor-core v3."""
    from oscar.kernels_numba import attention as K

    return max(base, F16_RTOL) if K.SPLIT_VERSION == 3 else base


def _kv(rng, b, h, t, d, dtype):
    k = rng.standard_normal((b, h, t, d)).astype(np.float32)
    k *= rng.lognormal(0.0, 0.7, size=(b, 1, t, 1)).astype(np.float32)
    v = rng.standard_normal((b, h, t, d)).astype(np.float32)
    kt = torch.from_numpy(k).to(TORCH_DT[dtype])
    vt = torch.from_numpy(v).to(TORCH_DT[dtype])
    return kt, vt


def _packed_np(block):
    """Packed arrays of either backend as NumPy, code words as uint32, params as raw bits."""
    out = {}
    for name, a in block.arrays().items():
        a = a.cpu().numpy() if isinstance(a, torch.Tensor) else a
        if name.endswith("codes"):
            a = a.view(np.uint32)
        elif a.dtype == np.float16:
            a = a.view(np.uint16)
        elif a.dtype == np.float32:
            a = a.view(np.uint32)
        out[name] = a
    return out


def _assert_same_packed(gpu_cache, ref_cache):
    g, r = _packed_np(gpu_cache.packed()), _packed_np(ref_cache.packed())
    assert g.keys() == r.keys()
    for name in g:
        assert g[name].shape == r[name].shape, name
        mismatch = int((g[name] != r[name]).sum())
        assert mismatch == 0, f"{name}: {mismatch} of {g[name].size} differ"


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CONFIGS = [
    oscar.OScaRConfig(),
    oscar.OScaRConfig(rotate_keys=False, scale_tokens=False, rotate_values=False),
    oscar.OScaRConfig(key_bits=4, value_bits=4, key_group_size=64, value_group_size=64),
    oscar.OScaRConfig(norm_scope="head", param_dtype="float32", key_group_size=128,
                      residual_length=256),
    oscar.OScaRConfig(scale_tokens=False),
    oscar.OScaRConfig(rotate_keys=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"k{c.key_bits}g{c.key_group_size}"
                         f"r{int(c.rotate_keys)}s{int(c.scale_tokens)}{c.norm_scope}")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_quantize_kv_bytes_equal_reference(cfg, dtype):
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 2, 8, 3 * cfg.residual_length + 5, 128, dtype)
    gpu = oscar.quantize_kv(k.to(DEV), v.to(DEV), cfg)
    ref = oscar.quantize_kv(k, v, cfg)
    assert gpu.backend == "numba" and ref.backend == "reference"
    assert (gpu.seq_len, gpu.quantized_len, gpu.residual_len) == (
        ref.seq_len, ref.quantized_len, ref.residual_len)
    assert gpu.nbytes == ref.nbytes
    _assert_same_packed(gpu, ref)


def test_quantize_kv_strided_and_misaligned_inputs():
    """Views the quantize kernel cannot read with 16-byte vectors (rows 2 bytes off alignment,
    and a [B, T, H, D] -> [B, H, T, D] transpose) are copied by the bridge: same bytes."""
    rng = np.random.default_rng(3)
    k, v = _kv(rng, 1, 8, 256, 128, "bfloat16")
    ref = oscar.quantize_kv(k, v)
    big_k = torch.zeros(1, 8, 256, 129, dtype=k.dtype, device=DEV)
    big_k[..., 1:] = k.to(DEV)
    kt = k.transpose(1, 2).contiguous().to(DEV).transpose(1, 2)  # strided, rows contiguous
    vt = v.transpose(1, 2).contiguous().to(DEV).transpose(1, 2)
    _assert_same_packed(oscar.quantize_kv(big_k[..., 1:], vt), ref)  # misaligned rows
    _assert_same_packed(oscar.quantize_kv(kt, v.to(DEV)), ref)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_append_one_by_one_and_chunks_equal_prefill(dtype):
    cfg = oscar.OScaRConfig(residual_length=64)
    rng = np.random.default_rng(2)
    t = 3 * 64 + 7
    k, v = _kv(rng, 2, 4, t, 64, dtype)
    k, v = k.to(DEV), v.to(DEV)
    whole = oscar.quantize_kv(k, v, cfg)
    one = oscar.quantize_kv(k[:, :, :0], v[:, :, :0], cfg)
    for i in range(t):
        one.append(k[:, :, i: i + 1], v[:, :, i: i + 1])
    chunks = oscar.quantize_kv(k[:, :, :5], v[:, :, :5], cfg)
    pos = 5
    for n in (1, 60, 3, 70, 40):
        chunks.append(k[:, :, pos: pos + n], v[:, :, pos: pos + n])
        pos += n
    chunks.append(k[:, :, pos:], v[:, :, pos:])
    for other in (one, chunks):
        assert other.seq_len == t
        _assert_same_packed(other, whole)
        q = torch.randn(2, 8, 1, 64, device=DEV)
        torch.testing.assert_close(oscar.decode_attention(q, other),
                                   oscar.decode_attention(q, whole), rtol=0, atol=0)


@pytest.mark.parametrize("seq_len", [1, 127, 128, 129, 4096 + 77, 32 * 1024 + 5])
@pytest.mark.parametrize("q_dtype", ["float16", "bfloat16", "float32"])
def test_decode_attention_matches_reference_llama_shapes(seq_len, q_dtype):
    """Llama-3.1-8B attention shapes: 32 query heads, 8 KV heads, head_dim 128."""
    rng = np.random.default_rng(seq_len)
    b = 2 if seq_len > 8192 else 3
    k, v = _kv(rng, b, 8, seq_len, 128, "bfloat16")
    q = torch.from_numpy(rng.standard_normal((b, 32, 1, 128)).astype(np.float32))
    q = q.to(TORCH_DT[q_dtype])
    gpu = oscar.quantize_kv(k.to(DEV), v.to(DEV))
    ref = oscar.quantize_kv(k, v)
    out_g = oscar.decode_attention(q.to(DEV), gpu)
    out_r = oscar.decode_attention(q.float(), ref)
    assert out_g.dtype == q.dtype and out_g.shape == q.shape
    assert _rel(out_g.float().cpu(), out_r) < _tol(OUT_RTOL[q_dtype])


@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=["oscar", "kivi", "int4g64", "head-f32"])
def test_decode_attention_gqa_qlen_lse(gqa, q_len, cfg):
    rng = np.random.default_rng(gqa * 10 + q_len)
    h = 2
    t = 2 * cfg.residual_length + 3
    k, v = _kv(rng, 3, h, t, 128, "float32")
    q = torch.from_numpy(rng.standard_normal((3, h * gqa, q_len, 128)).astype(np.float32))
    gpu = oscar.quantize_kv(k.to(DEV), v.to(DEV), cfg)
    ref = oscar.quantize_kv(k, v, cfg)
    out_g, lse_g = oscar.decode_attention(q.to(DEV), gpu, scale=0.07, return_lse=True)
    out_r, lse_r = oscar.decode_attention(q, ref, scale=0.07, return_lse=True)
    assert _rel(out_g.cpu(), out_r) < _tol(1e-4)
    np.testing.assert_allclose(lse_g.cpu().numpy(), lse_r.numpy(), rtol=_tol(1e-5),
                               atol=_tol(1e-5))


@pytest.mark.parametrize("gqa,q_len,row_blocks", [(8, 8, 2), (4, 16, 2), (8, 8, 1)])
def test_decode_attention_64_rows(gqa, q_len, row_blocks, monkeypatch):
    """64 query rows per KV head at head_dim 128 (GQA 8 at q_len 8, GQA 4 at q_len 16): one v3
    launch in 2 row blocks of 32 rows (kernels_numba.attention_mma.row_blocks), and with row
    blocks off (MAX_ROW_BLOCKS = 1) 2 launches over half the query heads each
    (kernels_numba.attention.head_groups); out and lse equal the reference's, and the two paths
    agree."""
    from oscar.kernels_numba import attention as K

    monkeypatch.setattr(K._split_v3, "MAX_ROW_BLOCKS", row_blocks)
    for f in (K._blocks_per_sm, K._residual_in_split):
        f.cache_clear()
    rng = np.random.default_rng(gqa + q_len)
    k, v = _kv(rng, 2, 2, 300, 128, "bfloat16")
    q = torch.from_numpy(rng.standard_normal((2, 2 * gqa, q_len, 128)).astype(np.float32))
    gpu = oscar.quantize_kv(k.to(DEV), v.to(DEV))
    ref = oscar.quantize_kv(k, v)
    assert gpu._store._head_groups(2 * gqa, q_len) == (1 if row_blocks > 1 else 2)
    out_g, lse_g = oscar.decode_attention(q.to(DEV).to(torch.bfloat16), gpu, return_lse=True)
    out_r, lse_r = oscar.decode_attention(q.to(torch.bfloat16).float(), ref, return_lse=True)
    assert _rel(out_g.float().cpu(), out_r) < _tol(OUT_RTOL["bfloat16"])
    np.testing.assert_allclose(lse_g.cpu().numpy(), lse_r.numpy(), rtol=F16_RTOL, atol=F16_RTOL)
    for f in (K._blocks_per_sm, K._residual_in_split):
        f.cache_clear()


@pytest.mark.parametrize("head_dim", [64, 256])
def test_other_head_dims(head_dim):
    rng = np.random.default_rng(head_dim)
    k, v = _kv(rng, 2, 4, 700, head_dim, "float16")
    q = torch.randn(2, 16, 1, head_dim)
    gpu = oscar.quantize_kv(k.to(DEV), v.to(DEV))
    ref = oscar.quantize_kv(k, v)
    _assert_same_packed(gpu, ref)
    assert _rel(oscar.decode_attention(q.to(DEV), gpu).cpu(),
                oscar.decode_attention(q, ref)) < _tol(1e-4)


def test_dequantize_matches_reference():
    rng = np.random.default_rng(5)
    k, v = _kv(rng, 2, 8, 300, 128, "float32")
    gpu = oscar.quantize_kv(k.to(DEV), v.to(DEV))
    ref = oscar.quantize_kv(k, v)
    kg, vg = oscar.dequantize_kv(gpu)
    kr, vr = oscar.dequantize_kv(ref)
    assert kg.shape == k.shape and kg.dtype == torch.float32
    # float32 un-rotation in both; only FMA contraction / summation order may differ: ~1e-6 rel.
    assert _rel(kg.cpu(), kr) < 1e-5 and _rel(vg.cpu(), vr) < 1e-5


def test_quality_on_synthetic_tni_matches_reference():
    """On the synthetic TNI data the GPU path reproduces the reference's quality numbers."""
    from oscar.synthetic import make_tni_kv

    data = make_tni_kv(seq_len=2048 + 40, seed=3)
    dense = attention_dense(data.q, data.k, data.v)
    errs = {}
    for name, cfg in (("oscar", CONFIGS[0]), ("kivi", CONFIGS[1])):
        gpu = oscar.quantize_kv(torch.from_numpy(data.k).to(DEV), torch.from_numpy(data.v).to(DEV),
                                cfg)
        out = oscar.decode_attention(torch.from_numpy(data.q).to(DEV), gpu).cpu().numpy()
        ref = oscar.decode_attention(data.q, oscar.quantize_kv(data.k, data.v, cfg))
        assert _rel(out, ref) < _tol(1e-4)
        errs[name] = _rel(out, dense)
    assert errs["oscar"] < 0.9 * errs["kivi"], errs


def test_side_stream_and_cuda_graph_replay():
    rng = np.random.default_rng(7)
    k, v = _kv(rng, 1, 8, 2048 + 50, 128, "bfloat16")
    cache = oscar.quantize_kv(k.to(DEV), v.to(DEV))
    q = torch.randn(1, 32, 1, 128, device=DEV, dtype=torch.bfloat16)
    eager = oscar.decode_attention(q, cache)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        side = oscar.decode_attention(q, cache)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(side, eager, rtol=0, atol=0)

    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):  # warm-up on the capture stream (compiles nothing new)
        oscar.decode_attention(q, cache)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        static_out = oscar.decode_attention(q, cache)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, oscar.decode_attention(q, cache), rtol=0, atol=0)


def test_nonfinite_prefill_raises_and_flush_propagates_nan():
    cfg = oscar.OScaRConfig(residual_length=32)
    k = torch.randn(1, 2, 64, 64, device=DEV)
    v = torch.randn(1, 2, 64, 64, device=DEV)
    bad = k.clone()
    bad[0, 1, 5, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        oscar.quantize_kv(bad, v, cfg)
    with pytest.raises(ValueError, match="finite"):
        oscar.quantize_kv(k[:, :, :40], torch.where(torch.arange(40, device=DEV)[:, None] == 39,
                                                    float("inf"), v[:, :, :40]), cfg)
    # a flush inside append does not synchronize: NaN reaches exactly the affected heads
    cache = oscar.quantize_kv(k, v, cfg.replace(norm_scope="head"))
    kn = torch.randn(1, 2, 32, 64, device=DEV)
    kn[0, 1, 7, 0] = float("nan")
    cache.append(kn, torch.randn(1, 2, 32, 64, device=DEV))
    q = torch.randn(1, 4, 1, 64, device=DEV)
    out = oscar.decode_attention(q, cache)
    assert torch.isfinite(out[:, :2]).all()  # query heads 0, 1 read KV head 0
    assert torch.isnan(out[:, 2:]).all()  # query heads 2, 3 read KV head 1
    with pytest.raises(ValueError, match="NaN or Inf"):
        cache.check()


def test_float16_overflow_raises_on_prefill():
    cfg = oscar.OScaRConfig(scale_tokens=False, rotate_keys=False, residual_length=32)
    k = torch.randn(1, 1, 32, 64, device=DEV) * 1e5
    with pytest.raises(ValueError, match="float16"):
        oscar.quantize_kv(k, torch.randn_like(k), cfg)


def test_device_errors():
    k = torch.randn(1, 2, 40, 64, device=DEV)
    cache = oscar.quantize_kv(k, k.clone(), oscar.OScaRConfig(residual_length=32))
    with pytest.raises(ValueError, match="q: expected a CUDA tensor"):
        oscar.decode_attention(torch.randn(1, 2, 1, 64), cache)
    with pytest.raises(ValueError, match="k_new: expected a CUDA tensor"):
        cache.append(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    with pytest.raises(ValueError, match="device"):
        oscar.quantize_kv(k, k.cpu())
    with pytest.raises(ValueError, match="backend='reference'"):
        oscar.quantize_kv(k, k, backend="reference")


def test_growth_and_reserve_keep_contents():
    cfg = oscar.OScaRConfig(residual_length=32)
    k = torch.randn(1, 2, 32 * 9, 64, device=DEV)
    v = torch.randn_like(k)
    grown = oscar.quantize_kv(k[:, :, :32], v[:, :, :32], cfg, max_seq_len=32)  # no headroom
    assert grown._store.capacity == 32
    for i in range(1, 9):
        grown.append(k[:, :, 32 * i: 32 * (i + 1)], v[:, :, 32 * i: 32 * (i + 1)])
    reserved = oscar.quantize_kv(k[:, :, :0], v[:, :, :0], cfg, max_seq_len=32 * 9)
    reserved.append(k, v)
    assert grown._store.capacity > 32 * 4 and reserved._store.capacity == 32 * 9
    _assert_same_packed(grown, reserved)


def test_unquantizable_residual_token_is_recorded_by_the_flush():
    """Issue 23 (2), CUDA side: append does not synchronize, so a token that float16 params
    cannot hold is accepted into the residual window; the flush that quantizes it writes NaN
    params for its groups and sets the status word (check() raises), and later flushes go on.
    The reference backend rejects the same append (tests/test_api_limits.py)."""
    cfg = oscar.OScaRConfig(residual_length=32)
    k = torch.randn(1, 2, 35, 64, device=DEV)
    cache = oscar.quantize_kv(k, k.clone(), cfg)
    bad_v = torch.randn(1, 2, 1, 64, device=DEV)
    bad_v[0, 1, 0, :] = 2e4  # the rotation puts 2e4 * 8 = 1.6e5 on channel 0
    cache.append(torch.randn(1, 2, 1, 64, device=DEV), bad_v)
    cache.check()  # still in the residual window: nothing quantized yet
    for _ in range(2 * 32):
        cache.append(torch.randn(1, 2, 1, 64, device=DEV), torch.randn(1, 2, 1, 64, device=DEV))
    assert cache.seq_len == 35 + 1 + 64 and cache.quantized_len == 96
    with pytest.raises(ValueError, match="outside the float16 range"):
        cache.check()


def test_float16_underflow_raises_on_prefill_and_flags_flush():
    """Issue 23 (3): a group entirely below 2**-14 cannot be stored in float16 params."""
    cfg = oscar.OScaRConfig(residual_length=32, key_bits=8, value_bits=8)
    k = torch.randn(1, 2, 64, 64, device=DEV)
    v = torch.randn(1, 2, 64, 64, device=DEV)
    with pytest.raises(ValueError, match="below 6.1e-05"):
        oscar.quantize_kv(k, v * 1e-6, cfg)
    ok = oscar.quantize_kv(k, v * 1e-6, cfg.replace(param_dtype="float32"))
    ref = oscar.quantize_kv(k.cpu(), v.cpu() * 1e-6, cfg.replace(param_dtype="float32"))
    _assert_same_packed(ok, ref)
    cache = oscar.quantize_kv(k, v, cfg)
    cache.append(k[:, :, :32], v[:, :, :32] * 1e-6)  # a flush inside append: recorded
    with pytest.raises(ValueError, match="below the float16 normal range"):
        cache.check()


def test_dequantize_float16_overflow_raises():
    """Issue 23 (4): float16 keys near 65504 dequantize beyond it: an error, or dtype=float32."""
    torch.manual_seed(0)
    k = (torch.randn(1, 2, 64, 64, device=DEV) * 3e4).clamp(-65504, 65504).half()
    cache = oscar.quantize_kv(k, k / 100, oscar.OScaRConfig(residual_length=32))
    with pytest.raises(ValueError, match="exceeds the float16 range"):
        oscar.dequantize_kv(cache)
    k_hat, _ = oscar.dequantize_kv(cache, dtype="float32")
    assert k_hat.dtype == torch.float32 and torch.isfinite(k_hat).all()
