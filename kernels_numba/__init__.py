"""Numba CUDA kernels of OScaR: the same stages as :mod:`oscar.reference`, on the GPU.

Modules import numba and numpy only (never torch). Importing this package imports numba.cuda
(through ``_compat``, which carries the NumPy 2.5 alias numba-cuda 0.30 needs).

Compile registry: every kernel module exposes ``compile_signatures()``, yielding
``(name, python_function, signature_string)`` for a representative set of configurations (the
name starts with the module's name; the python function is the undecorated kernel body, so it can
go to ``cuda.compile_ptx`` on a machine without a GPU). :func:`all_kernel_signatures` chains them; tests/test_kernels_compile.py compiles
every entry for sm_90.
"""

import importlib

#: Kernel modules in the registry; a module that does not exist (yet) is skipped.
KERNEL_MODULES = ("hadamard", "quantize", "dequantize", "attention", "append", "paged")


def all_kernel_signatures():
    """Yield ``(name, python_function, signature)`` from every kernel module's registry."""
    for name in KERNEL_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # a real import error inside an existing module
            continue
        yield from module.compile_signatures()
