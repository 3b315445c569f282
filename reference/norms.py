"""Omni-Token Scaling: the L2 norm of each (rotated) key token, in a fixed float32 order.

The norm of token t is taken over all KV heads and channels of that token (``scope="token"``, the
paper's choice, one scalar per batch row and token) or over the channels of one KV head
(``scope="head"``). To let the kernels reproduce it bit for bit, the sum of squares has one
defined order, the halving tree a GPU block reduction performs:

    s[i] = float32(x[i] * x[i])              i over the flattened (head, channel) index, zero-padded
                                              to a power of two P
    while P > 1:  P /= 2;  s[i] = s[i] + s[i + P]   for i < P      (float32 adds)
    norm = sqrt(s[0])                         (correctly rounded float32 sqrt)

Squares are rounded to float32 before any add: no fused multiply-add is allowed in this sum.
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


def token_norms(x: np.ndarray, scope: str = "token") -> np.ndarray:
    """L2 norms of the tokens of ``x[batch, num_kv_heads, seq_len, head_dim]`` (float32).

    Returns ``[batch, 1, seq_len]`` for ``scope="token"`` (over all heads and channels) and
    ``[batch, num_kv_heads, seq_len]`` for ``scope="head"``. Raw norms: zero and non-finite
    values are kept (see :func:`safe_norms`).
    """
    x = np.asarray(x, dtype=np.float32)
    b, h, t, d = x.shape
    sq = x * x  # float32, rounded once per element
    if scope == "token":
        flat = np.ascontiguousarray(sq.transpose(0, 2, 1, 3)).reshape(b, t, h * d)
        return np.sqrt(tree_sum_last(flat))[:, None, :]
    if scope == "head":
        return np.sqrt(tree_sum_last(sq))
    raise ValueError(f"scope must be 'token' or 'head', got {scope!r}")


def safe_norms(norms: np.ndarray) -> np.ndarray:
    """Replace norms that are zero or not finite by 1 (SPEC: such a token is stored unscaled)."""
    norms = np.asarray(norms, dtype=np.float32)
    bad = ~np.isfinite(norms) | (norms == 0)
    return np.where(bad, np.float32(1.0), norms).astype(np.float32)
