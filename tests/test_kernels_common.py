"""Device helpers shared by the kernels (kernels_numba/common.py), in isolation.

* ``fwht_lanes(per_lane, lanes)``: the register/shuffle Walsh-Hadamard transform of the quantize
  kernel (runs of 32 channels, head_dim / 32 lanes per token) and of ``fwht_warp`` (one row per
  warp, the decode kernels). It must equal ``reference.hadamard_transform(normalize=False)`` bit
  for bit for every geometry, including several rows per warp (lanes < 32).
* ``f32_to_bf16_bits``: the merge kernel's float32 -> bfloat16 store. It must equal torch's
  ``.to(torch.bfloat16)`` on ties, the overflow to infinity, subnormals, signed zeros and NaN.
* ``value_code_location``, ``value_param_location``: the kernels' copies of the packed-layout
  formulas (docs/format.md 2b, 2c) must equal the reference's for every (token, channel / group).

Run in the CUDA simulator on CPU and on the GPU when there is one (one warp per launch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oscar.kernels_numba._compat import SIMULATOR, cuda
from oscar.kernels_numba.common import (f32_to_bf16_bits, fwht_lanes, value_code_location,
                                        value_param_location)
from oscar.reference import pack as reference_pack
from oscar.reference.hadamard import hadamard_transform

if SIMULATOR:
    from oscar.kernels_numba.ptx_sim import install

    install()  # warp shuffles for the simulator's cuda module

pytestmark = [
    pytest.mark.sim,
    pytest.mark.skipif(not SIMULATOR and not cuda.is_available(),
                       reason="needs a CUDA GPU or the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"),
]


def _fwht_kernel(per_lane, lanes):
    fwht = fwht_lanes(per_lane, lanes)

    @cuda.jit
    def kernel(x, out):
        lane = cuda.threadIdx.x
        row = lane // lanes
        c0 = (lane % lanes) * per_lane
        v = cuda.local.array(per_lane, np.float32)
        for k in range(per_lane):
            v[k] = x[row, c0 + k]
        fwht(v, lane)
        for k in range(per_lane):
            out[row, c0 + k] = v[k]

    return kernel


@pytest.mark.parametrize("per_lane, lanes", [(32, 1), (32, 2), (32, 4), (32, 8), (4, 32),
                                             (1, 32), (8, 32), (2, 16)])
def test_fwht_lanes_equals_reference_bit_for_bit(per_lane, lanes):
    d = per_lane * lanes
    rows = 32 // lanes
    rng = np.random.default_rng(d + lanes)
    # spread magnitudes, so that the order of the additions shows in the rounding
    x = (rng.standard_normal((rows, d)) * np.exp2(rng.integers(-20, 20, (rows, d)))
         ).astype(np.float32)
    out = cuda.to_device(np.full((rows, d), np.nan, np.float32))
    _fwht_kernel(per_lane, lanes)[1, 32](cuda.to_device(x), out)
    got = out.copy_to_host()
    want = hadamard_transform(x, normalize=False)
    assert want.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (
        f"{(got != want).sum()} of {got.size} values differ")


@cuda.jit
def _bf16_kernel(x, out):
    for i in range(cuda.threadIdx.x, x.shape[0], cuda.blockDim.x):
        out[i] = f32_to_bf16_bits(x[i])


def test_f32_to_bf16_bits_equals_torch():
    special = np.array([
        0x00000000, 0x80000000,  # +-0
        0x3F800000, 0xBF800000,  # +-1
        0x3F808000, 0x3F818000,  # ties: to even (down), to even (up)
        0x3F808001, 0x3F807FFF,  # just above / below a tie
        0x7F7FFFFF, 0xFF7FFFFF,  # the largest finite floats round to +-inf
        0x7F7F7FFF,  # the largest that stays finite
        0x7F800000, 0xFF800000,  # +-inf
        0x00000001, 0x00008000, 0x00018000, 0x807FFFFF,  # subnormals (ties too)
        0x7FC00000, 0xFFC00001, 0x7F800001,  # NaNs (quiet, negative, signalling)
    ], dtype=np.uint32).view(np.float32)
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([special, rand])
    out = cuda.to_device(np.zeros(x.shape, np.int16))
    _bf16_kernel[1, 64](cuda.to_device(x), out)
    got = out.copy_to_host()
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    nan = np.isnan(x)
    assert ((got[nan] & 0x7FFF) > 0x7F80).all(), "a NaN input did not give a bfloat16 NaN"
    diff = np.flatnonzero(got[~nan] != want[~nan])
    assert diff.size == 0, (
        f"{diff.size} values differ, e.g. {x[~nan][diff[0]].view(np.uint32):#010x}: kernel "
        f"{got[~nan][diff[0]] & 0xFFFF:#06x}, torch {want[~nan][diff[0]] & 0xFFFF:#06x}")


def _location_kernel(head_dim, bits, groups):
    @cuda.jit
    def kernel(code_word, code_shift, prow, pgroup, ppart):
        t = cuda.threadIdx.x  # token of the tile
        for c in range(head_dim):
            w, sh = value_code_location(t, c, head_dim, bits)
            code_word[t, c] = w
            code_shift[t, c] = sh
        for j in range(groups):
            for part in range(2):
                r, g, p = value_param_location(t, j, part, groups)
                prow[t, j, part] = r
                pgroup[t, j, part] = g
                ppart[t, j, part] = p

    return kernel


@pytest.mark.parametrize("head_dim, bits, groups", [(128, 2, 4), (64, 4, 1), (32, 8, 2),
                                                    (256, 2, 16)])
def test_kernel_location_formulas_equal_reference(head_dim, bits, groups):
    outs = [cuda.to_device(np.full((32, head_dim), -1, np.int64)) for _ in range(2)]
    outs += [cuda.to_device(np.full((32, groups, 2), -1, np.int64)) for _ in range(3)]
    _location_kernel(head_dim, bits, groups)[1, 32](*outs)
    word, shift, prow, pgroup, ppart = (o.copy_to_host() for o in outs)
    t, c = np.meshgrid(np.arange(32), np.arange(head_dim), indexing="ij")
    want_word, want_shift = reference_pack.value_code_location(t, c, head_dim, bits)
    assert np.array_equal(word, want_word) and np.array_equal(shift, want_shift)
    t, j, part = np.meshgrid(np.arange(32), np.arange(groups), np.arange(2), indexing="ij")
    flat = reference_pack.value_param_location(t, j, part, groups)
    # the kernels index the tile's rows [32, groups, 2]: row, group, part of the flat index
    assert np.array_equal(prow * 2 * groups + pgroup * 2 + ppart, flat)
    assert prow.max() < 32 and pgroup.max() < groups
