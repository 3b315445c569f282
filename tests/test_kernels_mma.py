"""The tensor-core instruction the v3 decode kernel relies on, in isolation.

v3 feeds packed codes to ``mma.sync.m16n8k16`` as float16 *subnormals* (``code * 2**(p - 24)``,
one LOP3 per pair of codes, kernels_numba/attention_mma.py), so it needs the tensor cores to take
subnormal float16 inputs exactly, with exact products and float32 accumulation. This checks that
on the GPU (the H200 run of 2026-11-23 passed it) and the simulator's Python version
(ptx_sim.mma_f16) in CPU CI, against a float64 matrix product of the same fragments.
"""

from __future__ import annotations

import numpy as np
import pytest

from oscar.kernels_numba._compat import SIMULATOR, cuda

if SIMULATOR:
    from oscar.kernels_numba.ptx_sim import install, mma_f16

    install()
else:
    try:
        from oscar.kernels_numba.ptx import mma_f16
    except ImportError:  # pragma: no cover - numba-cuda without the extending API
        mma_f16 = None

needs_device = pytest.mark.skipif(
    not SIMULATOR and not cuda.is_available(),
    reason="needs a CUDA GPU or the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")


@cuda.jit
def _mma_kernel(a, b, out):
    lane = cuda.threadIdx.x
    zero = np.float32(0.0)
    c0, c1, c2, c3 = mma_f16(a[lane, 0], a[lane, 1], a[lane, 2], a[lane, 3], b[lane, 0],
                             b[lane, 1], zero, zero, zero, zero)
    out[lane, 0] = c0
    out[lane, 1] = c1
    out[lane, 2] = c2
    out[lane, 3] = c3


def _fragments(a16, b16):
    """m16n8k16 fragments (PTX ISA layout) of A [16, 16] and B [16, 8] float16 as uint32."""
    au = a16.view(np.uint16).astype(np.uint32)
    bu = b16.view(np.uint16).astype(np.uint32)
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8),
                                        (g + 8, 2 * t + 8))):
            a[lane, i] = au[row, col] | (au[row, col + 1] << 16)
        for i, k in enumerate((2 * t, 2 * t + 8)):
            b[lane, i] = bu[k, g] | (bu[k + 1, g] << 16)
    return a, b


@pytest.mark.sim
@needs_device
def test_mma_takes_subnormal_codes_exactly():
    rng = np.random.default_rng(0)
    # A: 2-bit codes at bit p of a zero-exponent float16 (p = 0, 2, ..., 8), as v3 unpacks them
    pos = rng.choice([0, 2, 4, 6, 8], size=(16, 16))
    codes = rng.integers(0, 4, size=(16, 16))
    a16 = (codes << pos).astype(np.uint16).view(np.float16)
    assert np.all(np.abs(a16.astype(np.float64)) < 2.0**-14)  # all subnormal or zero
    # B: query fragments scaled by 2**(10 - p), up to 2**10 in magnitude
    b16 = (rng.uniform(-1, 1, (16, 8)) * 2.0 ** rng.integers(0, 11, (16, 8))).astype(np.float16)
    a, b = _fragments(a16, b16)
    out = np.zeros((32, 4), np.float32)
    _mma_kernel[1, 32](a, b, out)
    want = a16.astype(np.float64) @ b16.astype(np.float64)
    got = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        got[g, 2 * t:2 * t + 2] = out[lane, :2]
        got[g + 8, 2 * t:2 * t + 2] = out[lane, 2:]
    # products are exact; 16 float32 additions: a few float32 ulps of the sum of magnitudes
    bound = 16 * 2.0**-23 * (np.abs(a16.astype(np.float64)) @ np.abs(b16.astype(np.float64)))
    assert np.all(np.abs(got - want) <= bound + 1e-45), np.abs(got - want).max()
    assert np.count_nonzero(want) > 100
