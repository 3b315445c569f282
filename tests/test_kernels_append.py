"""The residual append kernel (kernels_numba/append.py) copies bits exactly (simulator on CPU,
the device on a GPU): strided sources, every position, 2- and 4-byte elements."""

from __future__ import annotations

import numpy as np
import pytest

from oscar.kernels_numba import append as A
from oscar.kernels_numba._compat import cuda

pytestmark = pytest.mark.sim


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
@pytest.mark.parametrize("n,pos", [(1, 0), (1, 7), (3, 5), (8, 0)])
def test_append_copies_bits_at_pos(dtype, n, pos):
    rng = np.random.default_rng(n * 10 + pos)
    b, h, r, d = 2, 3, 8, 32
    big = rng.integers(-30000, 30000, size=(b, h, n + 2, d)).astype(dtype)
    k_new = big[:, :, 1:1 + n]            # a strided view of a larger array
    v_new = (big[:, :, 1:1 + n] * 3).astype(dtype)
    k_res = rng.integers(-5, 5, size=(b, h, r, d)).astype(dtype)
    v_res = k_res.copy()
    want_k, want_v = k_res.copy(), v_res.copy()
    want_k[:, :, pos:pos + n] = k_new
    want_v[:, :, pos:pos + n] = v_new
    dk, dv = cuda.to_device(k_res), cuda.to_device(v_res)
    dbig = cuda.to_device(big)
    A.append_residual(dbig[:, :, 1:1 + n], cuda.to_device(v_new), dk, dv, pos)  # k strided
    np.testing.assert_array_equal(dk.copy_to_host(), want_k)
    np.testing.assert_array_equal(dv.copy_to_host(), want_v)


def test_append_rejects_bad_position_and_dtype():
    k = np.zeros((1, 1, 2, 32), np.int16)
    res = np.zeros((1, 1, 4, 32), np.int16)
    with pytest.raises(ValueError, match="pos"):
        A.append_residual(k, k, res, res, 3)
    with pytest.raises(TypeError, match="k_res"):
        A.append_residual(k, k, res.astype(np.int32), res, 0)
