"""Independent oracles and input builders shared by the reference / API tests.

Nothing here calls into ``reference/``: the point is to check the NumPy reference against code
written straight from the documentation (SPEC.md, reference/pack.py docstrings) with plain loops.
"""

from __future__ import annotations

import math

import numpy as np

import oscar

#: float32 unit roundoff (half an ulp of 1.0): the error bound of one correctly rounded operation.
U32 = float(np.finfo(np.float32).eps) / 2
U64 = float(np.finfo(np.float64).eps) / 2

#: The ablation configurations of the paper (oscar/config.py module docstring).
KIVI = dict(rotate_keys=False, scale_tokens=False, rotate_values=False)
ROTATION_ONLY = dict(scale_tokens=False)
SCALING_ONLY = dict(rotate_keys=False)
ABLATIONS = {"kivi": KIVI, "rotation_only": ROTATION_ONLY, "scaling_only": SCALING_ONLY,
             "oscar": {}}


def make_kv(batch, num_kv_heads, seq_len, head_dim, seed=0, dtype=np.float32, spread=True):
    """Random ``k, v [batch, num_kv_heads, seq_len, head_dim]``.

    With ``spread`` the key tokens get norms over two orders of magnitude (a mild Token Norm
    Imbalance) and a few outlier channels, so that rotation and scaling both do something.
    """
    rng = np.random.default_rng(seed)
    shape = (batch, num_kv_heads, seq_len, head_dim)
    k = rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    if spread:
        k = k * np.exp(rng.uniform(-2.0, 2.0, size=(batch, 1, seq_len, 1)))
        k[..., : max(1, head_dim // 16)] *= 4.0
    return k.astype(dtype), v.astype(dtype)


def make_q(batch, num_q_heads, q_len, head_dim, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, num_q_heads, q_len, head_dim)).astype(dtype)


def to_f64(x) -> np.ndarray:
    """float64 NumPy copy of a NumPy array or CPU torch tensor (any float dtype)."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return x.detach().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def explicit_attention(q, k, v, scale=None):
    """Causal GQA softmax attention written out with loops, in float64.

    ``q [B, Hq, L, D]``, ``k, v [B, H, T, D]``. Query i sits at position ``T - L + i`` and sees
    tokens ``0 .. T - L + i``; query head h reads KV head ``h // (Hq // H)``. Returns
    ``(out [B, Hq, L, D], lse [B, Hq, L])`` with lse the natural log of sum exp of the scaled
    logits.
    """
    q, k, v = to_f64(q), to_f64(k), to_f64(v)
    b, hq, q_len, d = q.shape
    h, t = k.shape[1], k.shape[2]
    group = hq // h
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = np.zeros((b, hq, q_len, d))
    lse = np.zeros((b, hq, q_len))
    for bi in range(b):
        for qh in range(hq):
            kh = qh // group
            for i in range(q_len):
                visible = t - q_len + i + 1
                logits = [scale * float(np.dot(q[bi, qh, i], k[bi, kh, j]))
                          for j in range(visible)]
                m = max(logits)
                weights = [math.exp(s - m) for s in logits]
                total = math.fsum(weights)
                acc = np.zeros(d)
                for j in range(visible):
                    acc += (weights[j] / total) * v[bi, kh, j]
                out[bi, qh, i] = acc
                lse[bi, qh, i] = m + math.log(total)
    return out, lse


def slow_pack_keys(codes: np.ndarray, bits: int) -> np.ndarray:
    """Loop packer of docs/format.md (keys):

    ``k_codes[b, h, i, w, l] = OR_j code[b, h, 32*i + l, w*cpw + j] << (bits*j)``.
    """
    b_, h_, t_, d_ = codes.shape
    cpw = 32 // bits
    out = np.zeros((b_, h_, t_ // 32, d_ // cpw, 32), np.uint32)
    for b in range(b_):
        for h in range(h_):
            for i in range(t_ // 32):
                for w in range(d_ // cpw):
                    for lane in range(32):
                        word = 0
                        for j in range(cpw):
                            word |= int(codes[b, h, 32 * i + lane, w * cpw + j]) << (bits * j)
                        out[b, h, i, w, lane] = word
    return out


def slow_pack_values(codes: np.ndarray, bits: int) -> np.ndarray:
    """Loop packer of docs/format.md ("Value tiles"): per 32-token tile, slots are numbered in the
    nested order (kb, g, t4, pair, hi, chunk); slot s holds channel ``16*chunk + 8*hi + g`` of
    tokens ``16*kb + 8*pair + t4`` (low 16 bits) and that + 4 (high 16 bits), at bit
    ``bits * (s % (16/bits))`` of word ``s // (16/bits)`` of the tile's flat run."""
    b_, h_, t_, d_ = codes.shape
    hc = 16 // bits
    vw = d_ * bits // 32
    out = np.zeros((b_, h_, t_ * vw), np.uint64)
    for tile in range(t_ // 32):
        slot = 0
        for kb in range(2):
            for g in range(8):
                for t4 in range(4):
                    for pair in range(2):
                        for hi in range(2):
                            for chunk in range(d_ // 16):
                                for half in range(2):
                                    t = 32 * tile + 16 * kb + 8 * pair + 4 * half + t4
                                    c = 16 * chunk + 8 * hi + g
                                    word = tile * 32 * vw + slot // hc
                                    bit = 16 * half + bits * (slot % hc)
                                    out[:, :, word] |= codes[:, :, t, c].astype(np.uint64) << bit
                                slot += 1
    return out.astype(np.uint32).reshape(b_, h_, t_, vw)


def slow_pack_value_params(params: np.ndarray) -> np.ndarray:
    """Loop packer of docs/format.md ("Value param tiles"): per 32-token tile, a flat run of
    elements in the nested order (kb, part, t4, group, pair, half), element = param ``part``
    (0 scale, 1 min) of ``group`` of token ``16*kb + 8*pair + 4*half + t4``."""
    b_, h_, t_, ng, _ = params.shape
    out = np.empty((b_, h_, t_ * ng * 2), params.dtype)
    pos = 0
    for tile in range(t_ // 32):
        for kb in range(2):
            for part in range(2):
                for t4 in range(4):
                    for j in range(ng):
                        for pair in range(2):
                            for half in range(2):
                                t = 32 * tile + 16 * kb + 8 * pair + 4 * half + t4
                                out[:, :, pos] = params[:, :, t, j, part]
                                pos += 1
    return out.reshape(params.shape)


def assert_same_packed(cache_a, cache_b):
    """Every packed array and the residual of two caches are bit-identical."""
    pa, pb = cache_a.packed().arrays(), cache_b.packed().arrays()
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert np.array_equal(pa[name], pb[name]), name
    ka, va = cache_a.residual()
    kb, vb = cache_b.residual()
    assert np.array_equal(ka, kb) and np.array_equal(va, vb)
    assert (cache_a.quantized_len, cache_a.residual_len) == (cache_b.quantized_len,
                                                              cache_b.residual_len)


def config(**changes) -> "oscar.OScaRConfig":
    return oscar.OScaRConfig(**changes)


def host_array(a):
    """A torch tensor as a NumPy array for exact comparisons: bfloat16 as float32 (exact), int32
    (the CUDA backend's storage of uint32 codes) viewed as uint32."""
    a = a.detach().cpu()
    if str(a.dtype) == "torch.bfloat16":
        a = a.float()
    a = a.numpy()
    return a.view(np.uint32) if a.dtype == np.int32 else a
