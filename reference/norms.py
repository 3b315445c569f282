"""Omni-Token Scaling: the L2 norm of each (rotated) key token, in a fixed float32 order.

The norm of token t is taken over all KV heads and channels of that token (``scope="token"``, the
paper's choice, one scalar per batch row and token) or over the channels of one KV head
(``scope="head"``). To let the kernels reproduce it bit for bit, the sum of squares has one
defined order, built from the halving tree ``tree(s)`` (zero-pad ``s`` to a power of two P, then
``while P > 1: P /= 2; s[i] = s[i] + s[i + P] for i < P``; float32 adds):

    q[c] = float32(x[c] * x[c])                 squares, rounded before any add (no FMA)
    per head:  runs of R = min(P_D, 32) channels (P_D = head_dim padded to a power of two)
               r[j] = tree(q[j R : (j + 1) R])   one sum per run of 32 channels
               s_h  = tree(r)                     the head's sum
    scope "head":  norm = sqrt(s_h)
    scope "token": norm = sqrt(tree(s_0, s_1, ..., s_{H-1}))   heads zero-padded to a power of 2

with a correctly rounded float32 sqrt. The order is the one a GPU reaches without moving data: in
the quantize kernel a lane holds 32 consecutive channels of one token (its run, summed in
registers), the runs of a head sit in adjacent lanes (summed by butterfly shuffles) and the heads
are merged per token as the block walks them.
"""

from __future__ import annotations

import numpy as np


def tree_sum_last(sq: np.ndarray) -> np.ndarray:
    """Sum float32 ``sq[..., n]`` over the last axis by the halving tree (zero-padded to 2**k)."""
    n = sq.shape[-1]
    p = 1 << max(0, (n - 1).bit_length())
    if p != n:
        pad = np.zeros(sq.shape[:-1] + (p - n,), dtype=sq.dtype)
        sq = np.concatenate((sq, pad), axis=-1)
    while p > 1:
        p //= 2
        sq = sq[..., :p] + sq[..., p : 2 * p]
    return sq[..., 0]


#: Channels per run: the channels one warp lane of the quantize kernel holds (summed first).
RUN = 32


def head_sums(sq: np.ndarray) -> np.ndarray:
    """Sum float32 squares ``sq[..., D]`` per head: the halving tree inside each run of
    ``RUN`` channels, then the halving tree over the runs (D zero-padded to a power of two)."""
    d = sq.shape[-1]
    p = 1 << max(0, (d - 1).bit_length())
    if p != d:
        sq = np.concatenate((sq, np.zeros(sq.shape[:-1] + (p - d,), dtype=sq.dtype)), axis=-1)
    run = min(p, RUN)
    runs = tree_sum_last(sq.reshape(sq.shape[:-1] + (p // run, run)))
    return tree_sum_last(runs)


def token_norms(x: np.ndarray, scope: str = "token") -> np.ndarray:
    """L2 norms of the tokens of ``x[batch, num_kv_heads, seq_len, head_dim]`` (float32).

    Returns ``[batch, 1, seq_len]`` for ``scope="token"`` (over all heads and channels) and
    ``[batch, num_kv_heads, seq_len]`` for ``scope="head"``. Raw norms: zero and non-finite
    values are kept (see :func:`safe_norms`).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"x: expected [batch, num_kv_heads, seq_len, head_dim], got {x.shape}")
    per_head = head_sums(x * x)  # float32 squares, rounded once per element; [B, H, T]
    if scope == "token":
        heads_last = np.ascontiguousarray(per_head.transpose(0, 2, 1))  # [B, T, H]
        return np.sqrt(tree_sum_last(heads_last))[:, None, :]
    if scope == "head":
        return np.sqrt(per_head)
    raise ValueError(f"scope must be 'token' or 'head', got {scope!r}")


def safe_norms(norms: np.ndarray) -> np.ndarray:
    """Replace norms that are zero or not finite by 1 (SPEC: such a token is stored unscaled)."""
    norms = np.asarray(norms, dtype=np.float32)
    bad = ~np.isfinite(norms) | (norms == 0)
    return np.where(bad, np.float32(1.0), norms).astype(np.float32)
