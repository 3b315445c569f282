"""Normalized Walsh-Hadamard transform of rows, on the GPU.

Spec sheet
----------
Computes ``out[r, :] = hadamard_transform(float32(x[r, :]))`` of :mod:`oscar.reference.hadamard`,
bit for bit: the same butterflies in the same stage order (``common.fwht_shared``), then one
``mul.rn`` by ``hadamard_scale(D)``.

* Input ``x [rows, D]`` (any strides): float16, float32, or int16 holding bfloat16 bits.
  Output ``out [rows, D]`` float32 (any strides). ``D`` a power of two from 32 to 256.
* Grid: one block per ``ROWS_PER_BLOCK(D) = max(1, TILE_ELEMENTS // D)`` consecutive rows
  (the last block takes the remainder). Block: ``THREADS`` (256) threads, or ``threads=``;
  thread ``p`` loads and stores elements ``p, p + THREADS, ...`` of the row-major tile
  (coalesced for contiguous rows) and takes butterfly pairs in the same stride pattern inside
  each stage.
* Shared memory: one float32 tile ``[ROWS_PER_BLOCK, D]`` = ``TILE_ELEMENTS * 4`` bytes (16 KB).
* Limits: rows < 2**31 * ROWS_PER_BLOCK. ``out`` may alias a float32 ``x`` with the same strides
  (each block reads its whole tile before it writes it).

The quantize and dequantize kernels run the same ``fwht_shared`` on their own tiles.
"""

from __future__ import annotations

import functools

from ..reference.hadamard import hadamard_scale
from ._compat import cuda, np
from .kernel_cache import jit, launch
from .common import INPUT_ELEMENT_TYPES, check_threads, float32_loader, fwht_shared, mul_rn

#: Threads per block: 8 warps, enough to hide shared-memory latency of the butterflies while
#: leaving room for several blocks per SM.
THREADS = 256
#: float32 elements per block tile (16 KB of shared memory): 16 rows of head_dim 256,
#: 128 rows of head_dim 32.
TILE_ELEMENTS = 4096
HEAD_DIMS = (32, 64, 128, 256)


def rows_per_block(head_dim: int) -> int:
    return max(1, TILE_ELEMENTS // head_dim)


@functools.lru_cache(maxsize=None)
def _hadamard_source(head_dim: int, in_dtype: str, threads: int = THREADS):
    """(python kernel function, signature string) for one (head_dim, in_dtype, threads)."""
    d = head_dim
    rt = rows_per_block(d)
    nt = threads
    hs = hadamard_scale(d)  # np.float32 closure constant
    load = float32_loader(in_dtype)

    def hadamard_kernel(x, out):
        r0 = cuda.blockIdx.x * rt
        tid = cuda.threadIdx.x
        rows = min(rt, x.shape[0] - r0)
        buf = cuda.shared.array((rt, d), np.float32)
        p = tid
        while p < rows * d:
            r = p // d
            c = p - r * d
            buf[r, c] = load(x[r0 + r, c])
            p += nt
        fwht_shared(buf, rows, d, tid, nt)  # starts and ends with a barrier
        p = tid
        while p < rows * d:
            r = p // d
            c = p - r * d
            out[r0 + r, c] = mul_rn(buf[r, c], hs)
            p += nt

    sig = f"void({INPUT_ELEMENT_TYPES[in_dtype]}[:, :], float32[:, :])"
    return hadamard_kernel, sig


@functools.lru_cache(maxsize=None)
def _hadamard_kernel(head_dim: int, in_dtype: str, threads: int):
    fn, sig = _hadamard_source(head_dim, in_dtype, threads)
    return jit(fn, sig, name="hadamard", key=(head_dim, in_dtype, threads))


def hadamard_transform(x, out, in_dtype: str, stream=0, *, threads: int = THREADS) -> None:
    """``out[rows, D] = hadamard_transform(x[rows, D])`` (float32, bit-identical to the reference).

    ``x``: device array ``[rows, head_dim]`` of ``in_dtype`` ("float16", "float32", or
    "bfloat16" as int16 bits); ``out``: float32 device array of the same shape. ``threads``
    (threads per block, a power of two >= 32) is a launch-configuration override for tests.
    """
    check_threads(threads)
    if in_dtype not in INPUT_ELEMENT_TYPES:
        raise ValueError(f"in_dtype: expected one of {tuple(INPUT_ELEMENT_TYPES)}, "
                         f"got {in_dtype!r}")
    if len(x.shape) != 2:
        raise ValueError(f"x: expected a 2-D array [rows, head_dim], got shape {tuple(x.shape)}")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"out: expected shape {tuple(x.shape)}, got {tuple(out.shape)}")
    rows, d = x.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"x: expected head_dim in {HEAD_DIMS}, got {d}")
    if rows == 0:
        return
    rt = rows_per_block(d)
    kernel = _hadamard_kernel(d, in_dtype, threads)
    launch(kernel, (rows + rt - 1) // rt, threads, stream, x, out)


def compile_signatures():
    """(name, python function, signature) of a representative set of kernels for compile checks."""
    for d in HEAD_DIMS:
        for in_dtype in INPUT_ELEMENT_TYPES:
            fn, sig = _hadamard_source(d, in_dtype)
            yield f"hadamard.hadamard(d={d}, {in_dtype})", fn, sig
