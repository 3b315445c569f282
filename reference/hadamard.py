"""Canalized Rotation: the normalized Sylvester-Hadamard transform along the last axis.

``hadamard_transform(x) == x @ scipy.linalg.hadamard(D) / sqrt(D)`` up to float32 rounding, and
*bit-exactly* equal to the Numba kernels, which run the same butterflies in the same order:

    stage h = 1, 2, 4, ..., D/2:  for every pair (i, i + h) with i & h == 0:
        x[i], x[i + h] = x[i] + x[i + h], x[i] - x[i + h]        (float32 adds, no FMA)
    finally x *= float32(1 / sqrt(D))                              (one rounded multiply)

Float32 addition is deterministic, so the same pairing in the same stage order gives the same bits
on any IEEE machine. H is symmetric, orthogonal and its own inverse: applying the transform twice
returns the input (up to rounding).

Bytes: reads and writes x once per call (NumPy makes log2(D) temporaries; the kernel does the
stages in shared memory).
"""

from __future__ import annotations

import numpy as np


def hadamard_scale(head_dim: int) -> np.float32:
    """The float32 normalization constant 1/sqrt(head_dim), rounded once (shared with kernels)."""
    return np.float32(1.0 / np.sqrt(np.float64(head_dim)))


def hadamard_matrix(head_dim: int, dtype=np.float64) -> np.ndarray:
    """The normalized Sylvester-Hadamard matrix ``H[i, j] = (-1)**popcount(i & j) / sqrt(D)``."""
    idx = np.arange(head_dim)
    parity = (np.bitwise_count(idx[:, None] & idx[None, :]) & 1).astype(np.int64)
    return ((1 - 2 * parity) / np.sqrt(head_dim)).astype(dtype)


def hadamard_transform(x: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Fast Walsh-Hadamard transform of ``x[..., D]`` along the last axis, D a power of two.

    float32 input stays float32 (the exact butterfly order above); float64 stays float64 (used by
    tests as a high-precision oracle). Returns a new array; ``x`` is not modified.
    """
    x = np.asarray(x)
    d = x.shape[-1]
    if d & (d - 1) or d == 0:
        raise ValueError(f"last axis of x must be a power of two, got {d}")
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float32
    lead = x.shape[:-1]
    y = np.array(x, dtype=dtype, copy=True).reshape(-1, d)
    h = 1
    while h < d:
        # pairs (i, i + h) with i & h == 0: view as [rows, d / 2h, 2, h]
        y4 = y.reshape(-1, d // (2 * h), 2, h)
        a = y4[:, :, 0, :]
        b = y4[:, :, 1, :]
        y = np.stack((a + b, a - b), axis=2).reshape(-1, d)
        h *= 2
    if normalize:
        scale = hadamard_scale(d) if dtype == np.float32 else 1.0 / np.sqrt(np.float64(d))
        y = y * scale
    return y.reshape(*lead, d)
