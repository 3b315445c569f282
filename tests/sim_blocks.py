"""A faster thread-block runner for numba-cuda's CUDA simulator (test-only; installed by conftest).

numba-cuda 0.30's ``BlockManager`` runs each CUDA thread of a block as a Python thread and finds
out that every live thread has reached ``syncthreads()`` by *polling*: the launching thread spins
over the block's threads (``is_alive()``, a flag each) for as long as the block runs, so it holds
the GIL for about half of the time the block's own threads need. Profiled on the 2-core CI
machine, that loop was most of the main thread's time in the decode-kernel simulator tests.

This runner keeps the simulator's semantics and replaces the polling by a counting barrier under
one condition variable:

* ``syncthreads()`` waits until every thread of the block that has not returned is waiting (the
  simulator's rule: a thread that has returned no longer takes part, as on the GPU for exited
  threads); the last one to arrive, or the last one to return while the others wait, opens it;
* the launching thread sleeps until all threads have returned, or until one raises: then, as
  the simulator does, every other thread is told to abort at its next barrier, and the exception
  is raised (with the thread and block in its message) without waiting for them;
* ``syncthreads_count/and/or`` are the simulator's own (they call ``syncthreads()``).

Nothing changes in what a kernel computes: thread interleavings between barriers stay free (the
interpreter switches threads as before), and the warp collectives of ``kernels_numba/ptx_sim.py``
keep their own barriers.
"""

from __future__ import annotations

import threading

import numpy as np

_installed = None


def install():
    """Replace the simulator's BlockManager (idempotent); returns a function undoing it."""
    global _installed
    from numba.cuda.simulator import kernel as sim_kernel

    if _installed is not None:
        return _installed
    original = sim_kernel.BlockManager

    class _Thread(sim_kernel.BlockThread):
        def syncthreads(self):
            block = self._manager._block
            with block.cond:
                if self.abort:
                    raise RuntimeError("abort flag set on syncthreads call")
                generation = block.generation
                block.waiting += 1
                if block.waiting == block.live:
                    block.open()
                else:
                    while block.generation == generation and not self.abort:
                        block.cond.wait()
                if self.abort:
                    raise RuntimeError("abort flag set on syncthreads clear")

    class _Block:
        def __init__(self, live):
            self.cond = threading.Condition()
            self.live = live
            self.waiting = 0
            self.generation = 0
            self.failed = None

        def open(self):  # under cond
            self.waiting = 0
            self.generation += 1
            self.cond.notify_all()

    class BlockManager(original):
        def run(self, grid_point, *args):
            points = list(np.ndindex(*self._block_dim))
            block = self._block = _Block(len(points))
            threads = []

            def target():
                try:
                    self._f(*args)
                except BaseException:
                    with block.cond:
                        if block.failed is None:
                            block.failed = threading.current_thread()
                        for t in threads:
                            t.abort = True
                        block.cond.notify_all()
                    raise
                finally:
                    with block.cond:
                        block.live -= 1
                        if block.live == 0:
                            block.cond.notify_all()
                        elif block.waiting and block.waiting == block.live:
                            block.open()

            for point in points:
                threads.append(_Thread(target, self, grid_point, point, self._debug))
            for t in threads:
                t.start()
            with block.cond:
                while block.live and block.failed is None:
                    block.cond.wait()
                failed = block.failed
            if failed is not None:
                failed.join()  # BlockThread.run stores the exception after target returns
                raise failed.exception[0].with_traceback(failed.exception[1])
            for t in threads:
                t.join()
                if t.exception:
                    raise t.exception[0].with_traceback(t.exception[1])

    sim_kernel.BlockManager = BlockManager

    # Device functions: the simulator swaps ``cuda`` in the callee module's globals for the fake
    # module on every call, under a lock, and swaps it back on return. With 128 threads calling
    # device functions thousands of times, those locks are contended; here a module is swapped
    # once at its first device call of a launch and stays swapped until the launch returns.
    original_call = sim_kernel.FakeCUDAKernel.__call__
    from numba.cuda.simulator.kernelapi import swapped_cuda_module

    swapped = {}  # id(module globals) -> the entered swap, for the launch in progress
    swap_lock = threading.Lock()

    def __call__(self, *args):
        if self._device or sim_kernel._kernel_context:
            if sim_kernel._kernel_context:
                gid = id(self.fn.__globals__)
                if gid not in swapped:
                    with swap_lock:
                        if gid not in swapped:
                            swap = swapped_cuda_module(self.fn, sim_kernel._get_kernel_context())
                            swap.__enter__()
                            swapped[gid] = swap
                return self.fn(*args)
            return original_call(self, *args)  # a device function called from the host
        try:
            return original_call(self, *args)
        finally:
            with swap_lock:
                for swap in swapped.values():
                    swap.__exit__(None, None, None)
                swapped.clear()

    sim_kernel.FakeCUDAKernel.__call__ = __call__

    def uninstall():
        global _installed
        sim_kernel.BlockManager = original
        sim_kernel.FakeCUDAKernel.__call__ = original_call
        _installed = None

    _installed = uninstall
    return uninstall
