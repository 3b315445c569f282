"""Numba CUDA kernels of OScaR: the same stages as :mod:`oscar.reference`, on the GPU.

Modules import numba and numpy only (never torch). Importing this package imports numba.cuda
(through ``_compat``, which carries the NumPy 2.5 alias numba-cuda 0.30 needs).
"""
