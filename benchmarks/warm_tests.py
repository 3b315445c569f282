"""Compile the kernels of GPU test cases in parallel processes, before pytest runs them (GPU).

    python benchmarks/warm_tests.py [--workers 12] [--match multirow,qlen2,llama-32k-bf16]

The GPU tests of tests/test_kernels_attention.py compile each case's kernels in line (5-10 s a
kernel on the GPU machine, one at a time). This compiles the split (plain and fused) and merge
kernels of the selected cases (``MULTIROW_GPU_CASES`` and the ``GPU_CASES`` whose id contains one
of ``--match``) with the default dispatch into the on-disk kernel cache (``OSCAR_CACHE_DIR``),
one process per case, so that the tests then load them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _warm(case):
    import oscar
    from oscar.kernels_numba import attention as K

    (_, shape, _, _, q_len, changes, q_dtype, res_dtype), outs = case[0][:8], case[1]
    cfg = oscar.OScaRConfig(**changes)
    n = 0
    for out in outs:
        n += len(K.decode_kernels(cfg, shape["head_dim"], shape["gqa"], q_len, q_dtype,
                                  res_dtype, out))
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--match", default="multirow,qlen2,llama-32k-bf16")
    args = ap.parse_args(argv)
    import test_kernels_attention as T

    words = args.match.split(",")
    # (case, out dtypes): the multi-row test writes float32 out; test_gpu_matches_reference
    # also q's dtype
    cases = [(c, ("float32",)) for c in T.MULTIROW_GPU_CASES] if "multirow" in words else []
    cases += [(c, tuple(dict.fromkeys(("float32", c[6])))) for c in T.GPU_CASES
              if any(w in c[0] for w in words)]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(args.workers, len(cases)),
                                                mp_context=ctx) as pool:
        n = sum(pool.map(_warm, cases))
    print(f"warm_tests: {len(cases)} cases, {n} kernels ready in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
