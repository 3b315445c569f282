"""Data movement of the paged cache: tokens into residual windows, packed runs into/out of pages.

Spec sheet
----------
Two copy kernels; together with the fused quantize kernel (quantize.py) they are the CUDA write
path of :class:`oscar.PagedKVCache` (oscar/_paged_cuda.py), and the gather of its interim decode.
Both copy bits (no arithmetic), so their reference is plain indexing:

``copy_tokens(k_src, v_src, src_row, src_pos, k_dst, v_dst, dst_row, dst_pos)``
    ``k_dst[dst_row[i], h, dst_pos[i], :] = k_src[src_row[i], h, src_pos[i], :]`` (and v) for
    every item ``i`` and head ``h``. Arrays ``[rows, H, tokens, D]`` of 2- or 4-byte elements
    carried as int16 / int32 (bfloat16 and float16 as int16). It routes a write's new tokens
    (``[num_tokens, H, 1, D]`` views of ``[num_tokens, H, D]``) to their sequence's residual
    window or to the staging windows of a flush, and copies the tokens a window already held
    into staging. Grid ``(items, H)`` (x capped at MAX_BLOCKS, striding), block
    ``min(THREADS, D)`` threads striding over D.

``copy_runs(src, dst, runs)``
    ``dst[runs[i, 1] : runs[i, 1] + runs[i, 2]] = src[runs[i, 0] : runs[i, 0] + runs[i, 2]]``
    over flat uint32 words, for every run ``i`` (int64 ``[n, 3]``). Every packed section of a
    page is a run of words per (head, page run) (reference/paged.py): this scatters a flushed
    window's packed arrays (the quantize kernel's output, token-major per head) into the pages
    its tokens' slots name, and gathers pages into a contiguous workspace for decode. Grid
    ``n`` (capped at MAX_BLOCKS, striding), block ``THREADS`` threads striding over the run
    (coalesced 4-byte loads and stores).

Limits: runs and items below 2**31; grid y (H) <= 65535. No shared memory.
"""

from __future__ import annotations

import functools

from ._compat import SIMULATOR, cuda, np
from .kernel_cache import jit, launch

#: Threads per block of both kernels: copies of 32..256 channels or of runs of >= 256 words.
THREADS = 128
#: Blocks of a launch at most (grid x): both kernels loop over their items / runs with a stride
#: of the grid, so any grid is correct. On a GPU one block per item (up to 2**31 - 1); under the
#: CUDA simulator, which runs every thread as a Python thread, a few blocks of one warp each
#: (the CPU CI's simulator tests run 5x faster).
MAX_BLOCKS = 4 if SIMULATOR else 2**31 - 1
SIM_THREADS = 32
#: integer type that carries each element size of copy_tokens
ITEM_TYPES = {2: "int16", 4: "int32"}


def _copy_tokens_source(item_size: int):
    it = ITEM_TYPES[item_size]

    def copy_tokens(k_src, v_src, src_row, src_pos, k_dst, v_dst, dst_row, dst_pos):
        h = cuda.blockIdx.y
        i = cuda.blockIdx.x
        while i < src_row.shape[0]:
            sr, sp = src_row[i], src_pos[i]
            dr, dp = dst_row[i], dst_pos[i]
            c = cuda.threadIdx.x
            while c < k_src.shape[3]:
                k_dst[dr, h, dp, c] = k_src[sr, h, sp, c]
                v_dst[dr, h, dp, c] = v_src[sr, h, sp, c]
                c += cuda.blockDim.x
            i += cuda.gridDim.x

    sig = (f"void({it}[:, :, :, :], {it}[:, :, :, :], int32[::1], int32[::1], "
           f"{it}[:, :, :, ::1], {it}[:, :, :, ::1], int32[::1], int32[::1])")
    return copy_tokens, sig


def _copy_runs_source():
    def copy_runs(src, dst, runs):
        i = cuda.blockIdx.x
        while i < runs.shape[0]:
            s0, d0, n = runs[i, 0], runs[i, 1], runs[i, 2]
            w = cuda.threadIdx.x
            while w < n:
                dst[d0 + w] = src[s0 + w]
                w += cuda.blockDim.x
            i += cuda.gridDim.x

    return copy_runs, "void(uint32[::1], uint32[::1], int64[:, ::1])"


@functools.lru_cache(maxsize=None)
def _copy_tokens_kernel(item_size: int):
    fn, sig = _copy_tokens_source(item_size)
    return jit(fn, sig, name="copy_tokens", key=(item_size,))


@functools.lru_cache(maxsize=None)
def _copy_runs_kernel():
    fn, sig = _copy_runs_source()
    return jit(fn, sig, name="copy_runs", key=())


def copy_tokens(k_src, v_src, src_row, src_pos, k_dst, v_dst, dst_row, dst_pos,
                stream=0) -> None:
    """Launch :func:`copy_tokens` (module doc) over ``len(src_row)`` items (no-op for 0)."""
    n = int(src_row.shape[0])
    if n == 0:
        return
    item = np.dtype(k_src.dtype).itemsize
    if item not in ITEM_TYPES:
        raise TypeError(f"k_src: expected 2- or 4-byte elements, got {np.dtype(k_src.dtype)}")
    for name, a in (("v_src", v_src), ("k_dst", k_dst), ("v_dst", v_dst)):
        if np.dtype(a.dtype) != np.dtype(k_src.dtype):
            raise TypeError(f"{name}: expected dtype {np.dtype(k_src.dtype).name}, got "
                            f"{np.dtype(a.dtype).name}")
    heads, d = int(k_src.shape[1]), int(k_src.shape[3])
    threads = SIM_THREADS if SIMULATOR else min(THREADS, d)
    launch(_copy_tokens_kernel(item), (min(n, MAX_BLOCKS), heads), threads, stream,
           k_src, v_src, src_row, src_pos, k_dst, v_dst, dst_row, dst_pos)


def copy_runs(src, dst, runs, stream=0) -> None:
    """Launch :func:`copy_runs` (module doc) over the rows of ``runs`` (no-op for none)."""
    n = int(runs.shape[0])
    if n == 0:
        return
    launch(_copy_runs_kernel(), min(n, MAX_BLOCKS), SIM_THREADS if SIMULATOR else THREADS,
           stream, src, dst, runs)


def compile_signatures():
    """(name, python function, signature) of every kernel here, for compile checks."""
    for item in sorted(ITEM_TYPES):
        fn, sig = _copy_tokens_source(item)
        yield f"paged.copy_tokens({item})", fn, sig
    fn, sig = _copy_runs_source()
    yield "paged.copy_runs", fn, sig
