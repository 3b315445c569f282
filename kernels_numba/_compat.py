"""Import numba.cuda safely, and say whether kernels run in the CUDA simulator.

numba-cuda 0.30.x calls ``np.row_stack`` while compiling its first kernel; NumPy 2.5 removed that
alias (upstream numba-cuda will not fix 0.30). ``np.vstack`` is the same function, so we restore
the alias before numba.cuda is imported. Harmless on NumPy < 2.5, where the alias exists.
"""

from __future__ import annotations

import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack  # numpy >= 2.5 compatibility for numba-cuda 0.30 (see above)

from numba import config as _numba_config  # noqa: E402
from numba import cuda  # noqa: E402

#: True when NUMBA_ENABLE_CUDASIM=1: kernels run as Python threads (no PTX, no intrinsics).
SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

__all__ = ["cuda", "SIMULATOR", "np"]
