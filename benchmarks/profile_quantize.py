"""Time the library's quantize launch on the GPU (CUDA events, L2 flushed between runs).

    python benchmarks/profile_quantize.py [--batch 1] [--tokens 32768 128]

Prints, per shape, the device time of one launch replayed from a CUDA graph (no host cost), the
bytes read + written (bfloat16 K and V in, the packed arrays out) and the share of the device copy
bandwidth measured in the same run, then the time of an eager call (host cost included).
"""

from __future__ import annotations

import argparse
import warnings

import torch

import oscar

from gpu_timing import copy_bandwidth, time_cuda, time_graph  # noqa: E402  (benchmarks/ on path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 128])
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # Numba's low-occupancy warning for the 128-token flush
    copy_tbps = copy_bandwidth()
    print(f"copy bandwidth {copy_tbps:.2f} TB/s")
    for tokens in args.tokens:
        k = torch.randn(args.batch, 8, tokens, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cache = oscar.quantize_kv(k, v)
        store = cache._store
        nbytes = 2 * k.numel() * 2 + cache.nbytes

        def launch():
            store._quantize_into(k, v, 0)

        ms = time_graph(launch)
        eager = time_cuda(launch)
        tbps = nbytes / (ms * 1e-3) / 1e12
        print(f"B={args.batch} T={tokens}: {ms * 1e3:.1f} us device (graph replay), "
              f"{nbytes / 1e6:.1f} MB, {tbps:.2f} TB/s, {100 * tbps / copy_tbps:.0f}% of copy; "
              f"eager call {eager * 1e3:.1f} us")


if __name__ == "__main__":
    main()
