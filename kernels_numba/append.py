"""Copy new tokens into the residual window: one launch for keys and values.

``append_residual(k_new, v_new, k_res, v_res, pos)`` copies ``k_new, v_new [B, H, n, D]`` (any
strides) into ``k_res, v_res [B, H, R, D]`` at tokens ``pos .. pos + n - 1``, bit for bit (the
elements travel as integers of their size: bfloat16/float16 as int16, float32 as int32). It is the
residual half of a decode step's ``append`` on the CUDA backend: one kernel instead of two torch
copies and their slicing, so that a launch plan can issue it in microseconds.

Grid ``(B * H, n)``, one block per (batch, head, token), threads over the channels.

``append_rows`` (issue 25) is the device-decided append of a decode step: one token for every row
at the row's own residual length read from the device lengths array, which it advances (one
block per row, its only writer); see :func:`append_rows`.
"""

from __future__ import annotations

import functools

from ._compat import cuda, np
from .common import LEN_FLUSH, LEN_QUANTIZED, LEN_RESIDUAL, LENGTH_COLUMNS
from .kernel_cache import jit, launch

THREADS = 64
#: integer type that carries each element size
BITS_TYPES = {2: "int16", 4: "int32"}


def _append_source(item_size: int):
    it = BITS_TYPES[item_size]

    def append_kernel(k_new, v_new, k_res, v_res, pos):
        bh = cuda.blockIdx.x
        t = cuda.blockIdx.y
        heads = k_new.shape[1]
        b = bh // heads
        h = bh - b * heads
        c = cuda.threadIdx.x
        while c < k_new.shape[3]:
            k_res[b, h, pos + t, c] = k_new[b, h, t, c]
            v_res[b, h, pos + t, c] = v_new[b, h, t, c]
            c += cuda.blockDim.x

    sig = f"void({it}[:, :, :, :], {it}[:, :, :, :], {it}[:, :, :, ::1], {it}[:, :, :, ::1], int32)"
    return append_kernel, sig


@functools.lru_cache(maxsize=None)
def _append_kernel(item_size: int):
    fn, sig = _append_source(item_size)
    return jit(fn, sig, name="append", key=(item_size,))


#: Parameter names of the append kernel, in order (:func:`append_launch`).
APPEND_ARGS = ("k_new", "v_new", "k_res", "v_res", "pos")


def append_launch(k_new, v_new, k_res, v_res, pos):
    """``(kernel, grid, block, args)`` of one append (validated arrays, see the module doc)."""
    bsz, heads, n, _ = (int(x) for x in k_new.shape)
    item = np.dtype(k_new.dtype).itemsize
    return (_append_kernel(item), (bsz * heads, n), THREADS,
            (k_new, v_new, k_res, v_res, np.int32(pos)))


def append_residual(k_new, v_new, k_res, v_res, pos, stream=0) -> None:
    """Copy ``k_new, v_new [B, H, n, D]`` into ``k_res, v_res`` at token ``pos`` (see module)."""
    bsz, heads, n, d = (int(x) for x in k_new.shape)
    rb, rh, r, rd = (int(x) for x in k_res.shape)
    for name, arr in (("v_new", v_new), ("k_res", k_res), ("v_res", v_res)):
        if np.dtype(arr.dtype) != np.dtype(k_new.dtype):
            raise TypeError(f"{name}: expected dtype {np.dtype(k_new.dtype).name}, got "
                            f"{np.dtype(arr.dtype).name}")
    if np.dtype(k_new.dtype).itemsize not in BITS_TYPES:
        raise TypeError(f"k_new: expected 2- or 4-byte elements, got {np.dtype(k_new.dtype)}")
    if tuple(v_new.shape) != (bsz, heads, n, d) or tuple(v_res.shape) != (rb, rh, r, rd):
        raise ValueError("v_new, v_res: expected the shapes of k_new, k_res")
    if (rb, rh, rd) != (bsz, heads, d) or not 0 <= pos <= r - n:
        raise ValueError(f"k_res: expected [{bsz}, {heads}, >= pos + {n}, {d}] with "
                         f"0 <= pos <= R - n, got {(rb, rh, r, rd)} and pos={pos}")
    if n == 0:
        return
    kernel, grid, block, args = append_launch(k_new, v_new, k_res, v_res, pos)
    launch(kernel, grid, block, stream, *args)


def compile_signatures():
    """(name, python function, signature) of every append kernel, for compile checks."""
    for item in sorted(BITS_TYPES):
        fn, sig = _append_source(item)
        yield f"append.append({item})", fn, sig
        fn, sig = _append_rows_source(item, 128)
        yield f"append.append_rows({item}, 128)", fn, sig


# --- the device-decided append of a decode step (issue 25) ----------------------------------------

#: status[0] bit of a row that could not take a token: its window filled with no packed capacity
#: left for the flush (the token is dropped, nothing is written out of bounds; ``cache.check()``
#: raises). Bits 1, 2, 4 are the quantize kernel's.
STATUS_OVERFLOW = 8
ROWS_THREADS = 128


def _append_rows_source(item_size: int, residual_length: int):
    it = BITS_TYPES[item_size]
    R = residual_length

    def append_rows_kernel(k_new, v_new, k_res, v_res, lengths, status, capacity):
        # one block per row: the only writer of the row's lengths, after every thread has read
        # them (the barrier), so no block ever reads a length that is being changed
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        ql = lengths[b, LEN_QUANTIZED]
        rl = lengths[b, LEN_RESIDUAL]
        full = rl + 1 >= R  # this token fills the window: the flush kernel packs it next
        ok = rl < R and (not full or ql + R <= capacity)
        if ok:
            heads = k_new.shape[1]
            d = k_new.shape[3]
            i = tid
            while i < heads * d:
                h = i // d
                c = i - h * d
                k_res[b, h, rl, c] = k_new[b, h, 0, c]
                v_res[b, h, rl, c] = v_new[b, h, 0, c]
                i += cuda.blockDim.x
        cuda.syncthreads()
        if tid == 0:
            if not ok:
                lengths[b, LEN_FLUSH] = 0
                cuda.atomic.or_(status, 0, STATUS_OVERFLOW)
            elif full:
                lengths[b, LEN_QUANTIZED] = ql + R
                lengths[b, LEN_RESIDUAL] = 0
                lengths[b, LEN_FLUSH] = 1
            else:
                lengths[b, LEN_RESIDUAL] = rl + 1
                lengths[b, LEN_FLUSH] = 0

    sig = (f"void({it}[:, :, :, :], {it}[:, :, :, :], {it}[:, :, :, ::1], {it}[:, :, :, ::1], "
           "int32[:, ::1], int32[:], int32)")
    return append_rows_kernel, sig


@functools.lru_cache(maxsize=None)
def _append_rows_kernel(item_size: int, residual_length: int):
    fn, sig = _append_rows_source(item_size, residual_length)
    return jit(fn, sig, name="append_rows", key=(item_size, residual_length))


#: Parameter names of the append_rows kernel, in order (:func:`append_rows_launch`).
APPEND_ROWS_ARGS = ("k_new", "v_new", "k_res", "v_res", "lengths", "status", "capacity")


def append_rows_launch(k_new, v_new, k_res, v_res, lengths, status, capacity):
    """``(kernel, grid, block, args)`` of :func:`append_rows` (validated arrays)."""
    bsz = int(k_new.shape[0])
    item = np.dtype(k_new.dtype).itemsize
    r = int(k_res.shape[2])
    return (_append_rows_kernel(item, r), bsz, ROWS_THREADS,
            (k_new, v_new, k_res, v_res, lengths, status, np.int32(capacity)))


def append_rows(k_new, v_new, k_res, v_res, lengths, status, capacity, stream=0) -> None:
    """Append one token ``k_new, v_new [B, H, 1, D]`` to every row, each at its own residual
    length (``lengths[b, LEN_RESIDUAL]``, int32 ``[B, 4]`` on the device), and advance the row's
    lengths on the device: a token that fills the window (R = ``k_res.shape[2]``) counts it as
    packed (``LEN_QUANTIZED += R``, ``LEN_RESIDUAL = 0``) and sets ``LEN_FLUSH`` for the
    row-flush quantize launch that must follow (quantize.quantize_launch with ``lengths``); a
    row whose window fills with fewer than R packed tokens of ``capacity`` left takes nothing
    and sets ``STATUS_OVERFLOW`` in ``status``. Bit for bit (elements travel as integers)."""
    bsz, heads, n, d = (int(x) for x in k_new.shape)
    if n != 1:
        raise ValueError(f"k_new: expected one token per row ([B, H, 1, D]), got n={n}")
    if tuple(k_res.shape[:2]) != (bsz, heads) or int(k_res.shape[3]) != d:
        raise ValueError(f"k_res: expected [{bsz}, {heads}, R, {d}], got {tuple(k_res.shape)}")
    if tuple(lengths.shape) != (bsz, LENGTH_COLUMNS) or np.dtype(lengths.dtype) != np.int32:
        raise ValueError(f"lengths: expected int32 [{bsz}, {LENGTH_COLUMNS}], got "
                         f"{np.dtype(lengths.dtype).name} {tuple(lengths.shape)}")
    kernel, grid, block, args = append_rows_launch(k_new, v_new, k_res, v_res, lengths, status,
                                                   capacity)
    launch(kernel, grid, block, stream, *args)
