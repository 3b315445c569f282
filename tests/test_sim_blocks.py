"""The simulator's faster thread-block runner (tests/sim_blocks.py) keeps the simulator's rules.

Every kernel test on CPU runs through it, so a barrier that opened early, a thread that never ran,
an exception lost or a device function seeing the real ``numba.cuda`` would break them all in
ways that are hard to read. These kernels check each rule directly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
    reason="checks the CUDA simulator's block runner (NUMBA_ENABLE_CUDASIM=1 only)")

from oscar.kernels_numba._compat import cuda  # noqa: E402


@cuda.jit(device=True)
def _lane():
    return cuda.threadIdx.x % 32


@cuda.jit
def _staged_sum(x, out, early):
    """Three barrier rounds; threads >= early return before the second one."""
    buf = cuda.shared.array(64, np.float32)
    t = cuda.threadIdx.x
    buf[t] = x[cuda.blockIdx.x, t]
    cuda.syncthreads()
    total = 0.0
    for i in range(64):
        total += buf[i]
    if t >= early:
        out[cuda.blockIdx.x, t] = total
        return
    cuda.syncthreads()  # only the threads below `early` take part from here
    buf[t] = total + _lane()
    cuda.syncthreads()
    out[cuda.blockIdx.x, t] = buf[(t + 1) % early]


@cuda.jit
def _vote(out):
    t = cuda.threadIdx.x
    out[0] = cuda.syncthreads_count(t % 3 == 0)
    out[1] = cuda.syncthreads_and(t < 64)
    out[2] = cuda.syncthreads_or(t == 63)


@cuda.jit
def _fails(out, bad):
    t = cuda.threadIdx.x
    cuda.syncthreads()
    if t == bad:
        out[t] = 1.0 / 0  # ZeroDivisionError in one thread
    cuda.syncthreads()
    out[t] = t


def test_barriers_wait_for_every_live_thread():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for early in (64, 40, 1):
        out = np.full((3, 64), np.nan, np.float32)
        _staged_sum[3, 64](x, out, early)
        total = x.astype(np.float32).sum(axis=1, dtype=np.float32)
        t = np.arange(64)
        want = np.where(t[None, :] >= early, total[:, None],
                        total[:, None] + ((t[None, :] + 1) % early) % 32)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)


def test_syncthreads_count_and_or():
    out = np.zeros(3, np.int64)
    _vote[1, 96](out)
    assert out.tolist() == [32, 0, 1]


def test_an_exception_in_one_thread_is_raised_with_its_thread():
    out = np.zeros(32, np.float32)
    with pytest.raises(ZeroDivisionError, match=r"tid=\[5, 0, 0\] ctaid=\[0, 0, 0\]"):
        _fails[1, 32](out, 5)
    _fails[1, 32](out, -1)  # the runner is usable again afterwards
    assert out.tolist() == list(range(32))


def test_device_functions_of_another_module_see_the_launch_then_get_cuda_back():
    # A device function in a module of its own: it reads cuda.threadIdx through that module's
    # globals, which the runner swaps once for the launch and must restore after it.
    import types

    import numba.cuda as real_cuda

    other = types.ModuleType("other_device_module")
    exec("from numba import cuda\n"
         "@cuda.jit(device=True)\n"
         "def twice_tid():\n"
         "    return 2 * cuda.threadIdx.x + 100 * cuda.blockIdx.x\n", other.__dict__)
    twice_tid = other.twice_tid

    @cuda.jit
    def kernel(out):
        out[cuda.blockIdx.x, cuda.threadIdx.x] = twice_tid()

    for _ in range(2):  # a second launch swaps again
        out = np.zeros((2, 48), np.int64)
        kernel[2, 48](out)
        assert (out == 2 * np.arange(48)[None, :] + 100 * np.arange(2)[:, None]).all()
        assert other.cuda is real_cuda
        assert globals()["cuda"] is real_cuda
