"""Test configuration shared by every test file.

* Puts ``tests/`` on sys.path so helper modules import as plain modules (no __init__.py).
* Runs Numba kernels under the CUDA simulator when no NVIDIA GPU is visible (CPU CI), unless
  NUMBA_ENABLE_CUDASIM is already set. This must happen before numba is first imported.
* Under the simulator, replaces its thread-block runner by tests/sim_blocks.py (a counting
  barrier instead of a polling loop; device-function modules swapped once per launch) and sets
  the interpreter's thread switch interval to 1 ms: each CUDA thread is a Python thread, and
  together they make the decode-kernel simulator cases 3-5x faster on the 2-core CI machine
  (measured: a v1 split case 5.1 s -> 1.0 s, a v3 case 9.0 s -> 2.6 s).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def _gpu_visible() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _gpu_visible():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    import sim_blocks

    sim_blocks.install()
    sys.setswitchinterval(1e-3)


def _cuda_available() -> tuple[bool, str]:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False, "NUMBA_ENABLE_CUDASIM=1: kernels run in the simulator, not on a GPU"
    try:
        import oscar.kernels_numba._compat as compat
    except ImportError as exc:
        return False, f"numba-cuda not importable ({exc})"
    if not compat.cuda.is_available():
        return False, "no CUDA GPU visible to numba"
    try:
        import torch
    except ImportError:
        return False, "torch not installed"
    if not torch.cuda.is_available():
        return False, "torch has no CUDA"
    return True, ""


def pytest_collection_finish(session):
    """Start the sm_90 compile of tests/test_kernels_compile.py now, in a subprocess, when its
    tests are selected: it takes minutes of one core and overlaps with the simulator tests."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_compile"):
            module.start_compile()
            return


def pytest_sessionfinish(session, exitstatus):
    """End the early compile subprocess if the session stops before waiting for it (-x, ^C)."""
    module = sys.modules.get("test_kernels_compile")
    started = getattr(module, "_STARTED", None)
    if started is not None and started[0].poll() is None:
        started[0].kill()
        started[0].wait()


def pytest_collection_modifyitems(config, items):
    import pytest

    if not any("gpu" in item.keywords for item in items):
        return
    ok, why = _cuda_available()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _atomic_simulator_shared_arrays():
    """Work around a race in numba-cuda 0.30's simulator (test-only shim).

    ``FakeCUDAShared.array`` creates a block's shared array on first use with an unlocked
    get-then-set keyed on the caller's (file, line): two threads preempted inside that window
    each create an array, and one of them then works on a private copy. Seen as a rare failure of
    a 256-thread dequantize: 132 wrong outputs = one thread's 4 elements (garbage from np.empty)
    spread over 4 rows by the FWHT, plus its own 4 outputs. This replacement takes a lock; the
    caller key is the same (file, line) of the frame that called ``cuda.shared.array``.
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        yield
        return
    import threading

    import numpy as np
    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / unsupported: as before
            return original(self, shape, dtype, alignment)
        dtype = np.dtype(kernelapi.numpy_support.as_dtype(dtype)
                         if isinstance(dtype, kernelapi.types.Type) else dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = np.empty(shape, dtype)
                self._allocations[caller] = res
        return res

    kernelapi.FakeCUDAShared.array = array
    try:
        yield
    finally:
        kernelapi.FakeCUDAShared.array = original
