"""Decode attention over a packed cache (SPEC section 5), in float64: the oracle of the kernels.

For query head h (KV head ``h // (num_q_heads // num_kv_heads)``), quantized token t and
residual token r:

    s_t = scale * n_t * (H q_h) . u_hat_t          u_hat: dequantized rotated/scaled key
    s_r = scale * q_h . k_r                        raw residual key
    p   = softmax over all tokens (max-subtracted), lse = log sum exp
    out = H (sum_t p_t v_rot_hat_t) + sum_r p_r v_r

With ``q_len > 1`` the queries are the last ``q_len`` tokens of the cache and attend causally:
query i sits at position ``seq_len - q_len + i`` and sees tokens ``0 .. seq_len - q_len + i``.
Everything here runs in float64 from the float32 dequantized values, so the kernels (float32
accumulation) are compared against a more precise result than their own.
"""

from __future__ import annotations

import numpy as np

from .block import PackedBlock, dequantize_block_rotated
from .hadamard import hadamard_transform


def _expand_heads(x: np.ndarray, group: int) -> np.ndarray:
    """``[B, H, ...]`` to ``[B, H * group, ...]``: query head h reads KV head h // group."""
    return np.repeat(x, group, axis=1) if group > 1 else x


def _causal_mask(q_len: int, seq_len: int) -> np.ndarray:
    """Boolean ``[q_len, seq_len]``, True where query i may attend token j."""
    pos = seq_len - q_len + np.arange(q_len)
    return np.arange(seq_len)[None, :] <= pos[:, None]


def _softmax(scores: np.ndarray, mask: np.ndarray):
    """Masked softmax and lse; a row that sees no token (an empty cache row) gets weights 0
    and lse -inf (its output is then zeros)."""
    s = np.where(mask, scores, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total == 0, 0.0, e / np.where(total == 0, 1.0, total))
        lse = (m + np.log(total))[..., 0]
    return p, lse


def attention_dense(q, k, v, scale=None, return_lse=False):
    """Plain causal-decode attention in float64 over dense ``k, v [B, H, T, D]`` (GQA aware)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = scale * np.einsum("bhld,bhtd->bhlt", q, _expand_heads(k, group))
    p, lse = _softmax(s, _causal_mask(q.shape[2], k.shape[2]))
    out = np.einsum("bhlt,bhtd->bhld", p, _expand_heads(v, group))
    return (out, lse) if return_lse else out


def decode_attention(q, block: PackedBlock, k_residual, v_residual, config, scale=None,
                     return_lse=False, start=None, seq_lens=None):
    """Attention of ``q [B, num_q_heads, q_len, D]`` over a packed block plus residual tokens.

    Args:
        q: queries (any float dtype; computed in float64).
        block: the quantized tokens (``PackedBlock``; may hold zero tokens).
        k_residual, v_residual: ``[B, num_kv_heads, residual_len, D]`` unquantized tokens that
            follow the quantized ones.
        config: the cache's :class:`oscar.OScaRConfig`.
        scale: logit scale, default ``1 / sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp ``[B, num_q_heads, q_len]``.
        start: optional int ``[B]``: row b attends only tokens ``start[b] ..`` (the first valid
            token of a left-padded row, or the first key of a sliding window); tokens before it
            get zero weight. None (default) is the same as all zeros, bit for bit. The caller
            keeps ``start[b] <= seq_len - q_len`` so that every query sees a token.
        seq_lens: optional int ``[B]``, rows of different lengths: row b holds
            ``seq_lens[b] // R * R`` quantized tokens (the first of the block's token axis, which
            is as long as the longest row) and ``seq_lens[b] % R`` residual tokens (the first of
            the residual arrays), R = ``config.residual_length``; its queries sit at positions
            ``seq_lens[b] - q_len + i``. A row that sees no token (e.g. empty) gets zeros and lse
            -inf. None: every row holds the whole block and residual.

    Returns float64 ``out [B, num_q_heads, q_len, D]`` (and ``lse``).
    """
    q = np.asarray(q, np.float64)
    b, hq, q_len, d = q.shape
    h = block.v_codes.shape[1]
    group = hq // h
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    u_hat, v_rot = (a.astype(np.float64) for a in dequantize_block_rotated(block, config))
    k_res = np.asarray(k_residual, np.float64)
    v_res = np.asarray(v_residual, np.float64)
    t_q, t_r = u_hat.shape[2], k_res.shape[2]

    q_rot = hadamard_transform(q) if config.rotate_keys else q
    s_q = np.einsum("bhld,bhtd->bhlt", q_rot, _expand_heads(u_hat, group))
    if block.norms is not None:
        n = block.norms.astype(np.float64)  # [B, S, T_q]
        n = n[:, :, None, :] if n.shape[1] == 1 else _expand_heads(n, group)[:, :, None, :]
        s_q = s_q * n
    s_r = np.einsum("bhld,bhtd->bhlt", q, _expand_heads(k_res, group))
    s = scale * np.concatenate((s_q, s_r), axis=-1)
    if seq_lens is None:
        mask = _causal_mask(q_len, t_q + t_r)
        if start is not None:  # [B, 1, q_len, T]: causal and at or after the row's first token
            first = np.asarray(start, np.int64).reshape(b, 1, 1, 1)
            mask = mask[None, None] & (np.arange(t_q + t_r)[None, None, None, :] >= first)
    else:  # per row: valid tokens, their positions, causal and from the row's first token
        r_len = config.residual_length
        seq = np.asarray(seq_lens, np.int64).reshape(b, 1)
        ql, rl = seq // r_len * r_len, seq % r_len
        tq, tr = np.arange(t_q)[None, :], np.arange(t_r)[None, :]
        pos = np.concatenate((np.broadcast_to(tq, (b, t_q)), ql + tr), axis=1)  # [B, T]
        valid = np.concatenate((tq < ql, tr < rl), axis=1)
        last = seq - q_len + np.arange(q_len)[None, :]  # [B, q_len]
        mask = valid[:, None, :] & (pos[:, None, :] <= last[:, :, None])
        if start is not None:
            mask &= pos[:, None, :] >= np.asarray(start, np.int64).reshape(b, 1, 1)
        mask = mask[:, None]  # [B, 1, q_len, T]
    p, lse = _softmax(s, mask)

    out_rot = np.einsum("bhlt,bhtd->bhld", p[..., :t_q], _expand_heads(v_rot, group))
    if config.rotate_values:
        out_rot = hadamard_transform(out_rot)
    out = out_rot + np.einsum("bhlt,bhtd->bhld", p[..., t_q:], _expand_heads(v_res, group))
    return (out, lse) if return_lse else out
