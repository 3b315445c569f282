"""Copy new tokens into the residual window: one launch for keys and values.

``append_residual(k_new, v_new, k_res, v_res, pos)`` copies ``k_new, v_new [B, H, n, D]`` (any
strides) into ``k_res, v_res [B, H, R, D]`` at tokens ``pos .. pos + n - 1``, bit for bit (the
elements travel as integers of their size: bfloat16/float16 as int16, float32 as int32). It is the
residual half of a decode step's ``append`` on the CUDA backend: one kernel instead of two torch
copies and their slicing, so that a launch plan can issue it in microseconds.

Grid ``(B * H, n)``, one block per (batch, head, token), threads over the channels.
"""

from __future__ import annotations

import functools

from ._compat import cuda, np
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
