"""Launch plans: a kernel launch prepared once, then issued through the CUDA driver per step.

Numba's dispatcher spends tens of microseconds per tensor argument on every launch (typing the
argument, building a strided view, packing it: numba-cuda 0.30.4, ../shared/KERNELS.md). A decode
step passes about 20 arrays that never change between steps (the packed cache, the residual
window, the workspace) and three that do (q, out, lse), plus a few integers. A
:class:`PreparedLaunch` packs the whole parameter list once, with numba-cuda's own argument
packing (``_Kernel._prepare_args``, so the bytes are exactly the dispatcher's), checks it against
the compiled kernel's parameter layout reported by the driver, and then launches with
``cuLaunchKernel`` on torch's current stream after patching only the fields that change (a data
pointer, a scalar). A launch then costs a few microseconds of host time.

This relies on numba-cuda internals (``_Kernel._prepare_args``, ``_codelibrary.get_cufunc()``,
the kernel handle of cuda.core) and on the driver's parameter query (``cuKernelGetParamInfo``,
CUDA 12.4+). Everything internal is used here only; :func:`plan_support` says whether plans can
be used, and any mismatch — a parameter count or size that differs from the driver's, a missing
attribute, an older numba-cuda — raises :class:`PlanUnavailable` at plan build, and the callers
fall back to the dispatcher. ``OSCAR_LAUNCH_PLANS=0`` turns plans off; the CUDA simulator never
uses them.
"""

from __future__ import annotations

import ctypes
import os

from .kernels_numba._compat import SIMULATOR

#: numba-cuda versions whose internals the plans were checked against (parameter packing and the
#: kernel handle). Another version disables plans with a reason (``plan_support``).
TESTED_NUMBA_CUDA = ("0.30",)


class PlanUnavailable(RuntimeError):
    """A launch plan cannot be built here; use the dispatcher."""


_SUPPORT = None


def plan_support() -> tuple[bool, str]:
    """``(True, "")`` when launch plans can be used in this process, else ``(False, reason)``."""
    global _SUPPORT
    if os.environ.get("OSCAR_LAUNCH_PLANS", "1") == "0":
        return False, "OSCAR_LAUNCH_PLANS=0"
    if SIMULATOR:
        return False, "CUDA simulator"
    if _SUPPORT is None:
        try:
            from importlib.metadata import version

            nbc = version("numba-cuda")
            if not nbc.startswith(TESTED_NUMBA_CUDA):
                raise PlanUnavailable(f"numba-cuda {nbc} (plans are checked against "
                                      f"{', '.join(TESTED_NUMBA_CUDA)}.x)")
            from cuda.bindings import driver  # noqa: F401
            from numba.cuda.dispatcher import _Kernel

            if not hasattr(_Kernel, "_prepare_args"):
                raise PlanUnavailable("numba-cuda has no _Kernel._prepare_args")
            _SUPPORT = (True, "")
        except Exception as exc:  # any import or version problem: dispatcher
            _SUPPORT = (False, f"{type(exc).__name__}: {exc}")
    return _SUPPORT


def _driver():
    from cuda.bindings import driver

    return driver


def _check(result, what):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise PlanUnavailable(f"{what} failed: {err}")
    return result[1:] if isinstance(result, tuple) else ()


def param_sizes(kernel) -> list[int] | None:
    """Sizes in bytes of the compiled kernel's parameters, from the driver; None when the driver
    cannot say (then a plan is not built)."""
    cufunc = kernel._codelibrary.get_cufunc()
    info = getattr(getattr(cufunc, "kernel", None), "arguments_info", None)
    if info is not None:
        try:
            return [int(p.size) for p in info]
        except Exception:
            pass
    drv = _driver()
    query = getattr(drv, "cuKernelGetParamInfo", None)
    if query is None:
        return None
    sizes = []
    h = drv.CUkernel(int(cufunc.handle))
    for i in range(4096):
        res = query(h, i)
        if int(res[0]) != 0:
            break
        sizes.append(int(res[2]))
    return sizes or None


def packed_sizes(argtypes) -> list[int]:
    """Sizes in bytes of the kernel parameters that Numba's calling convention makes of
    ``argtypes`` (numba types), in order: an array of ``ndim`` dimensions is ``5 + 2 * ndim``
    words of 8 bytes (meminfo, parent, nitems, itemsize, data, shape..., strides...); a scalar
    is its own size. A plan's packed parameters must have exactly these sizes (checked at plan
    build), and tests/test_kernels_compile.py checks them against the ``.param`` list of every
    kernel's PTX."""
    from numba.core import types

    sizes = []
    for ty in argtypes:
        if isinstance(ty, types.Array):
            sizes += [8] * (5 + 2 * ty.ndim)
        elif isinstance(ty, types.Integer):
            sizes.append(ty.bitwidth // 8)
        elif isinstance(ty, types.Float):
            sizes.append(ty.bitwidth // 8)
        elif ty == types.boolean:
            sizes.append(1)
        else:
            raise PlanUnavailable(f"parameter type {ty} is not supported by launch plans")
    return sizes


def _as_ctype(value):
    """One packed parameter as a ctypes object (Python ints are 8-byte words, as numba-cuda's
    launch passes them: pointers, sizes, shapes and strides)."""
    if isinstance(value, bool):
        return ctypes.c_bool(value)
    if isinstance(value, int):
        return ctypes.c_int64(value) if value < 2 ** 63 else ctypes.c_uint64(value)
    if isinstance(value, ctypes._SimpleCData):
        return type(value)(value.value)
    raise PlanUnavailable(f"unexpected packed parameter {type(value).__name__}")


class PreparedLaunch:
    """One kernel launch with its parameters packed once.

    Args:
        dispatcher: a Numba dispatcher with exactly one compiled overload.
        grid, block: launch dimensions (ints or tuples).
        args: the arguments as the dispatcher would take them (Numba device arrays, NumPy
            scalars).

    :meth:`set_pointer` patches the data pointer of array argument ``i`` and :meth:`set_scalar`
    the value of scalar argument ``i``; :meth:`launch` issues the kernel on a raw stream handle.
    """

    def __init__(self, dispatcher, grid, block, args):
        ok, why = plan_support()
        if not ok:
            raise PlanUnavailable(why)
        overloads = list(dispatcher.overloads.values())
        if len(overloads) != 1:
            raise PlanUnavailable(f"{len(overloads)} compiled overloads (expected 1)")
        kernel = overloads[0]
        if kernel.debug or getattr(kernel, "cooperative", False):
            raise PlanUnavailable("debug or cooperative kernel")
        argtypes = kernel.argument_types
        if len(argtypes) != len(args):
            raise PlanUnavailable(f"{len(args)} arguments for {len(argtypes)} parameters")
        packed, self._spans = [], []
        retr = []
        for ty, val in zip(argtypes, args):
            start = len(packed)
            kernel._prepare_args(ty, val, 0, retr, packed)
            self._spans.append((start, len(packed)))
        if retr:
            raise PlanUnavailable("an argument needs a host write-back (not a device array)")
        self._items = [_as_ctype(v) for v in packed]
        sizes = param_sizes(kernel)
        mine = [ctypes.sizeof(x) for x in self._items]
        if sizes is None:
            raise PlanUnavailable("the driver does not report the kernel's parameter layout")
        if not sizes == mine == packed_sizes(argtypes):
            raise PlanUnavailable(f"parameter layout mismatch: driver {sizes}, packed {mine}, "
                                  f"expected {packed_sizes(argtypes)}")
        self.param_sizes = sizes
        self._ptrs = (ctypes.c_void_p * len(self._items))(
            *[ctypes.addressof(x) for x in self._items])
        self._ptrs_addr = ctypes.addressof(self._ptrs)
        drv = _driver()
        handle = kernel._codelibrary.get_cufunc().handle
        getter = getattr(drv, "cuKernelGetFunction", None)
        if getter is not None:
            (func,) = _check(getter(drv.CUkernel(int(handle))), "cuKernelGetFunction")
        else:  # a CUkernel handle is accepted where a CUfunction is expected (CUDA 12+)
            func = drv.CUfunction(int(handle))
        self._launch = drv.cuLaunchKernel
        self._func = func
        g = tuple(grid) if isinstance(grid, tuple) else (int(grid),)
        b = tuple(block) if isinstance(block, tuple) else (int(block),)
        self.grid = tuple(int(x) for x in g + (1,) * (3 - len(g)))
        self.block = tuple(int(x) for x in b + (1,) * (3 - len(b)))
        self.kernel = kernel
        self._args_alive = args  # keep the device arrays (and their memory) referenced

    def field(self, arg: int, offset: int = 0):
        """The ctypes object of packed word ``offset`` of argument ``arg`` (for patching)."""
        start, stop = self._spans[arg]
        if not 0 <= offset < stop - start:
            raise IndexError(f"argument {arg} has {stop - start} packed words")
        return self._items[start + offset]

    def pointer_field(self, arg: int):
        """The data-pointer word of array argument ``arg`` (Numba's array ABI: meminfo, parent,
        nitems, itemsize, data, shape..., strides...)."""
        return self.field(arg, 4)

    def launch(self, stream: int) -> None:
        g, b = self.grid, self.block
        err = self._launch(self._func, g[0], g[1], g[2], b[0], b[1], b[2], 0, stream,
                           self._ptrs_addr, 0)
        if int(err[0]) != 0:
            raise RuntimeError(f"cuLaunchKernel failed: {err[0]}")


_RAW_STREAM = None  # torch's getter of the current raw stream handle, looked up once


def current_stream(device_index: int) -> int:
    """torch's current raw stream handle on a device (cheap: called every step)."""
    global _RAW_STREAM
    if _RAW_STREAM is None:
        import torch

        _RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
            lambda i: torch.cuda.current_stream(i).cuda_stream)
    return int(_RAW_STREAM(device_index))
