"""Device functions shared by the kernels: bit casts, bfloat16 loads, exact rounding, the FWHT.

Each has a GPU implementation (libdevice / plain arithmetic compiled by NVVM) and, where the CUDA
simulator lacks the GPU primitive (libdevice bit casts return NaN there), a NumPy shim with the
same semantics. Which one is used is fixed at import time by ``SIMULATOR``.
"""

from __future__ import annotations

import math

from ._compat import SIMULATOR, cuda, np

if SIMULATOR:

    @cuda.jit(device=True)
    def int_as_float(i):
        """Reinterpret the 32 bits of an int as float32 (simulator shim)."""
        return np.array([i], dtype=np.int64).astype(np.uint32).view(np.float32)[0]

    @cuda.jit(device=True)
    def float_as_int(x):
        """Reinterpret a float32's bits as int32 (simulator shim)."""
        return np.int32(np.array([x], dtype=np.float32).view(np.int32)[0])

else:
    from numba.cuda import libdevice

    int_as_float = libdevice.int_as_float
    float_as_int = libdevice.float_as_int


@cuda.jit(device=True)
def bf16_bits_to_f32(bits):
    """bfloat16 stored as int16 (torch exports bfloat16 as a void type) to float32, exactly."""
    return int_as_float(np.int32((np.int32(bits) & np.int32(0xFFFF)) << np.int32(16)))


@cuda.jit(device=True)
def rint_half_even(y):
    """Round float32 ``y`` to the nearest integer, ties to even (= numpy.rint), as float32.

    ``y - floor(y)`` is exact for |y| < 2**23, the range the quantizer uses (codes <= 255).
    """
    r = math.floor(y)
    d = y - r
    if d > np.float32(0.5):
        r += np.float32(1.0)
    elif d == np.float32(0.5):
        if math.fmod(r, np.float32(2.0)) != np.float32(0.0):
            r += np.float32(1.0)
    return np.float32(r)


@cuda.jit(device=True)
def fwht_shared(buf, rows, d, tid, nthreads):
    """In-place unnormalized Walsh-Hadamard transform of ``buf[0:rows, 0:d]`` (shared memory).

    Same butterflies in the same stage order as ``reference.hadamard_transform``: stage h pairs
    ``(i, i + h)`` with ``i & h == 0`` and writes ``(a + b, a - b)`` -- bit-identical float32.
    All ``nthreads`` threads of the block must call it; it ends with a barrier.
    """
    half = d // 2
    h = 1
    while h < d:
        cuda.syncthreads()
        p = tid
        while p < rows * half:
            row = p // half
            j = p - row * half
            i = (j // h) * 2 * h + (j % h)
            a = buf[row, i]
            b = buf[row, i + h]
            buf[row, i] = a + b
            buf[row, i + h] = a - b
            p += nthreads
        h *= 2
    cuda.syncthreads()
