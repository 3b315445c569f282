"""CUDA-simulator versions of the inline-PTX intrinsics (``ptx.py``) and of the warp collectives.

Numba's CUDA simulator runs each CUDA thread as a Python thread and has neither inline PTX nor
warp shuffles, votes or ``syncwarp``. This module gives the tensor-core split kernel
(``attention_mma``) Python equivalents with the PTX semantics, so that CPU CI runs that kernel
on tiny shapes against the NumPy reference (tests/test_kernels_attention.py). Imported only when
``NUMBA_ENABLE_CUDASIM=1``. The GPU build never sees it.

* Warp collectives: a warp's 32 threads meet at a per-warp condition variable and exchange one
  value each (``_warp_exchange``: one wait per exchange, double-buffered slots; 3-7x faster than
  the two ``threading.Barrier`` waits it replaced). :func:`install` adds ``shfl_sync``,
  ``shfl_xor_sync``, ``any_sync`` and ``syncwarp`` to the simulator's ``cuda`` module. Every
  lane of a warp must call them the same number of times, as on the GPU with a full mask.
* ``mma_f16``: the lanes exchange their fragments (the m16n8k16 layout of the PTX ISA, the one
  the GPU tests validated), and each computes ``A @ B + C`` in float64 and returns its four
  accumulators.
* Addresses: ``global_address`` / ``shared_address`` return ``slot << 40 | byte offset`` into a
  registry of the arrays they saw, and the loads, stores and ``cp_async16_bo`` resolve them.
  A strided (non-contiguous) view, such as a section of the paged pool, is addressed inside the
  contiguous array that owns its memory. The copy is immediate: the commit and wait calls are no-ops.
* float16 operations round like the hardware: ``cvt.rn`` to nearest even, the products of two
  float16 exactly in float32 and then rounded once.
"""

from __future__ import annotations

import threading

import numpy as np

from ._compat import SIMULATOR

if not SIMULATOR:  # pragma: no cover - guarded by the importer
    raise ImportError("oscar.kernels_numba.ptx_sim is for the CUDA simulator only")

_M32 = 0xFFFFFFFF
_SHIFT = 40
_lock = threading.Lock()
_warps: dict = {}
_slots: dict = {}
_arrays: list = []
#: a warp whose lanes diverge in their collectives would hang: fail instead
_TIMEOUT_S = 120.0


# --- warp collectives -----------------------------------------------------------------------


class _Warp:
    """Exchange state of one simulated warp: a generation counter and two slot buffers.

    One wait per exchange: lanes of exchange n write buffer n % 2, and the last to arrive
    advances the generation and wakes the others. A lane can only reach exchange n + 2 (which
    reuses buffer n % 2) after every lane has arrived at exchange n + 1, i.e. after every lane
    has read the values of exchange n.
    """

    __slots__ = ("cond", "count", "gen", "slots")

    def __init__(self):
        self.cond = threading.Condition()
        self.count = 0
        self.gen = 0
        self.slots = ([None] * 32, [None] * 32)


def _warp_exchange(value):
    """Every lane of the calling warp contributes ``value``; returns (lane, all 32 values)."""
    t = threading.current_thread()
    lane = t.thread_id % 32
    key = (id(t._manager), t.blockIdx.x, t.blockIdx.y, t.blockIdx.z, t.thread_id // 32)
    warp = _warps.get(key)
    if warp is None:
        with _lock:
            warp = _warps.setdefault(key, _Warp())
    with warp.cond:
        gen = warp.gen
        slots = warp.slots[gen & 1]
        slots[lane] = value
        warp.count += 1
        if warp.count == 32:
            warp.count = 0
            warp.gen = gen + 1
            warp.cond.notify_all()
        elif not warp.cond.wait_for(lambda: warp.gen != gen, timeout=_TIMEOUT_S):
            raise RuntimeError(f"warp {key[1:]}: lane {lane} waited {_TIMEOUT_S:.0f} s for the "
                               "other lanes of a warp collective (divergent collectives?)")
    return lane, list(slots)


def _shfl_sync(self, mask, value, src_lane):
    _, values = _warp_exchange(value)
    return values[int(src_lane) & 31]


def _shfl_xor_sync(self, mask, value, lane_mask):
    lane, values = _warp_exchange(value)
    return values[(lane ^ int(lane_mask)) & 31]


def _any_sync(self, mask, predicate):
    _, values = _warp_exchange(bool(predicate))
    return any(values)


def _syncwarp(self, mask=_M32):
    _warp_exchange(None)


def install():
    """Add the warp collectives the v3 kernel uses to the simulator's ``cuda`` module."""
    from numba.cuda.simulator import kernelapi

    module = kernelapi.FakeCUDAModule
    for name, fn in (("shfl_sync", _shfl_sync), ("shfl_xor_sync", _shfl_xor_sync),
                     ("any_sync", _any_sync), ("syncwarp", _syncwarp)):
        if not hasattr(module, name):
            setattr(module, name, fn)


# --- addresses and memory -------------------------------------------------------------------


def _root(a):
    """``(root, byte offset of a's first element in it)``: the C-contiguous ndarray owning the
    memory of view ``a`` (the page views of a paged pool are strided views of it), or
    ``(None, 0)`` when the view's chain of bases ends elsewhere (e.g. a torch tensor's memory)."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not root.flags["C_CONTIGUOUS"]:
        return None, 0
    start = a.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return root, start


def _span(a):
    """A uint8 array aliasing the bytes of strided view ``a`` (non-negative strides), from its
    first element to its last: loads and stores through it reach ``a``'s memory."""
    import ctypes

    if any(st < 0 for st in a.strides):
        raise ValueError("simulated address of a view with negative strides")
    extent = a.itemsize + sum((n - 1) * st for n, st in zip(a.shape, a.strides) if n)
    buf = (ctypes.c_uint8 * extent).from_address(a.__array_interface__["data"][0])
    return np.ctypeslib.as_array(buf)


def _address(array, index):
    a = getattr(array, "_ary", array)  # a simulator device array wraps an ndarray
    if not a.flags["C_CONTIGUOUS"]:  # a strided view: address the bytes it lives in
        idx = index if isinstance(index, tuple) else (index,)
        off = sum(int(i) * int(st) for i, st in zip(idx, a.strides))
        root, start = _root(a)
        if root is not None:  # a view of a contiguous ndarray (the paged pool's sections)
            return _address(root, (0,) * root.ndim) + np.int64(start + off)
        with _lock:  # e.g. a slice of a torch tensor: its own byte span, aliased
            slot = _slots.get(id(a))
            if slot is None or _arrays[slot][0] is not a:
                slot = len(_arrays)
                _arrays.append((a, _span(a)))
                _slots[id(a)] = slot
        return np.int64((slot << _SHIFT) | off)
    with _lock:
        slot = _slots.get(id(a))
        if slot is None or _arrays[slot][0] is not a:
            slot = len(_arrays)
            _arrays.append((a, a.reshape(-1).view(np.uint8)))
            _slots[id(a)] = slot
    idx = index if isinstance(index, tuple) else (index,)
    off = int(np.ravel_multi_index(tuple(int(i) for i in idx), a.shape)) * a.itemsize
    # int64, not a Python int: ``address + lane`` with a NumPy int32 lane must not wrap at 32 bits
    return np.int64((slot << _SHIFT) | off)


global_address = _address
shared_address = _address


def _bytes(addr, nbytes):
    addr = int(addr)
    view = _arrays[addr >> _SHIFT][1]
    off = addr & ((1 << _SHIFT) - 1)
    if off % min(nbytes, 16) or off + nbytes > view.size:
        raise ValueError(f"misaligned or out-of-bounds {nbytes}-byte access at offset {off}")
    return view[off:off + nbytes]


def _load(nbytes, dtype):
    def load(base, off):
        vals = _bytes(int(base) + int(off), nbytes).copy().view(dtype)
        return vals[0] if vals.size == 1 else tuple(vals)

    return load


lds4 = _load(16, np.uint32)
lds2 = _load(8, np.uint32)
lds1 = _load(4, np.uint32)
lds4f = _load(16, np.float32)
lds1f = _load(4, np.float32)


def ldg4(addr):
    return lds4(addr, 0)


ldcg4 = ldg4


def ldcg1f(addr):
    return lds1f(addr, 0)


def ldg1s(addr):
    return np.int32(lds1(addr, 0).view(np.int32))


def sts2(base, off, v0, v1):
    _bytes(int(base) + int(off), 8)[:] = np.array([int(v0) & _M32, int(v1) & _M32],
                                                  np.uint32).view(np.uint8)


def sts4(base, off, v0, v1, v2, v3):
    _bytes(int(base) + int(off), 16)[:] = np.array(
        [int(v) & _M32 for v in (v0, v1, v2, v3)], np.uint32).view(np.uint8)


def rcp_approx(x):
    with np.errstate(divide="ignore"):
        return np.float32(np.float32(1.0) / np.float32(x))


def sts1f(base, off, value):
    _bytes(int(base) + int(off), 4)[:] = np.array([value], np.float32).view(np.uint8)


def cp_async16_bo(base, off, src):
    _bytes(int(base) + int(off), 16)[:] = _bytes(src, 16)


def redux_max_u32(x):
    """``redux.sync.max.u32``: the warp's largest value (a warp collective)."""
    _, values = _warp_exchange(int(x) & _M32)
    return np.uint32(max(values))


def cp_async_commit():
    pass


class _Barrier:
    """State of one simulated named barrier: arrivals and a generation counter."""

    __slots__ = ("cond", "count", "gen")

    def __init__(self):
        self.cond = threading.Condition()
        self.count = 0
        self.gen = 0


def bar_sync(ident, count):
    """``bar.sync ident, count``: the calling thread waits until ``count`` threads of its block
    have arrived at named barrier ``ident`` (the generation counter lets a barrier be reused at
    once, as on the GPU)."""
    t = threading.current_thread()
    key = (id(t._manager), t.blockIdx.x, t.blockIdx.y, t.blockIdx.z, "bar", int(ident))
    bar = _warps.get(key)
    if bar is None:
        with _lock:
            bar = _warps.setdefault(key, _Barrier())
    with bar.cond:
        gen = bar.gen
        bar.count += 1
        if bar.count == int(count):
            bar.count = 0
            bar.gen = gen + 1
            bar.cond.notify_all()
        elif not bar.cond.wait_for(lambda: bar.gen != gen, timeout=_TIMEOUT_S):
            raise RuntimeError(f"named barrier {ident}: waited {_TIMEOUT_S:.0f} s for "
                               f"{count} threads")


def fence_acq_rel_gpu():
    pass  # the simulator's threads share one coherent memory


def cp_async_wait0():
    pass


def cp_async_wait1():
    pass


def cp_async_wait2():
    pass


def cp_async_wait3():
    pass


# --- bit and float16 operations -------------------------------------------------------------


def _halves(x):
    x = int(x) & _M32
    return np.array([x & 0xFFFF, x >> 16], np.uint16).view(np.float16)


def _pack(h):
    u = np.asarray(h, np.float16).view(np.uint16)
    return np.uint32(int(u[0]) | (int(u[1]) << 16))


def prmt(a, b, sel):
    src = (int(a) & _M32) | ((int(b) & _M32) << 32)
    out = 0
    for i in range(4):
        byte = (int(sel) >> (4 * i)) & 7
        out |= ((src >> (8 * byte)) & 0xFF) << (8 * i)
    return np.uint32(out)


def ex2(x):
    with np.errstate(over="ignore"):
        r = np.float32(np.exp2(np.float32(x)))
    return np.float32(0.0) if r < np.float32(2.0 ** -126) else r  # .ftz


def pack_f16x2(lo, hi):
    return _pack(np.array([lo, hi], np.float32).astype(np.float16))


def hmul2(a, b):
    return _pack((_halves(a).astype(np.float32) * _halves(b).astype(np.float32))
                 .astype(np.float16))


def f16x2_lo(x):
    return np.float32(_halves(x)[0])


def f16x2_hi(x):
    return np.float32(_halves(x)[1])


def float_as_uint(x):
    return np.array([x], np.float32).view(np.uint32)[0]


def uint_as_float(u):
    return np.array([int(u) & _M32], np.uint32).view(np.float32)[0]


def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """m16n8k16, row.col, f16 x f16 + f32 (fragment layout of the PTX ISA), warp-collective."""
    lane, frags = _warp_exchange((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3))
    a = np.zeros((16, 16))
    b = np.zeros((16, 8))
    c = np.zeros((16, 8))
    for ln, f in enumerate(frags):
        g, t = ln >> 2, ln & 3
        a[g, 2 * t:2 * t + 2] = _halves(f[0])
        a[g + 8, 2 * t:2 * t + 2] = _halves(f[1])
        a[g, 2 * t + 8:2 * t + 10] = _halves(f[2])
        a[g + 8, 2 * t + 8:2 * t + 10] = _halves(f[3])
        b[2 * t:2 * t + 2, g] = _halves(f[4])
        b[2 * t + 8:2 * t + 10, g] = _halves(f[5])
        c[g, 2 * t:2 * t + 2] = f[6], f[7]
        c[g + 8, 2 * t:2 * t + 2] = f[8], f[9]
    with np.errstate(invalid="ignore", over="ignore"):
        d = a @ b + c
    g, t = lane >> 2, lane & 3
    return (np.float32(d[g, 2 * t]), np.float32(d[g, 2 * t + 1]),
            np.float32(d[g + 8, 2 * t]), np.float32(d[g + 8, 2 * t + 1]))
