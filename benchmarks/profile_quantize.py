"""Time the quantize kernel alone on the GPU (CUDA events, L2 flushed between runs).

    python benchmarks/profile_quantize.py [--batch 1] [--tokens 32768 128] [--maxreg 0 128]

Prints, per shape and register cap, the median device time, the bytes read + written (bf16 K and V
in, packed arrays out) and the share of the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from numba import cuda

import oscar
from oscar.kernels_numba import quantize as kq

from gpu_timing import copy_bandwidth, time_cuda, time_graph  # noqa: E402  (benchmarks/ on path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 128])
    ap.add_argument("--maxreg", type=int, nargs="+", default=[0],
                    help="register caps to compare (0: the library's setting)")
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
        views = store._views(0, tokens)
        key = kq._quantize_key(store.config, 128, "bfloat16", 8)
        fn, sig = kq._quantize_source(*key)
        grid = (tokens // store.config.key_group_size, 1, args.batch)
        kn, vn = cuda.as_cuda_array(k.view(torch.int16)), cuda.as_cuda_array(v.view(torch.int16))
        for reg in args.maxreg:
            kern = kq._quantize_kernel(key) if reg == 0 else cuda.jit(sig, max_registers=reg)(fn)
            def launch():  # on torch's current stream (the capture stream inside a graph)
                stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
                kern[grid, kq.threads_per_block(128), stream](
                    kn, vn, views["k_codes"], views["k_params"], views["v_codes"],
                    views["v_params"], views["norms"], store.status_nb)

            launch()  # compile
            ms = time_graph(launch)
            tbps = nbytes / (ms * 1e-3) / 1e12
            print(f"B={args.batch} T={tokens} maxreg={reg or 'lib'}: {ms * 1e3:.1f} us (graph), "
                  f"{nbytes / 1e6:.1f} MB, {tbps:.2f} TB/s, {100 * tbps / copy_tbps:.0f}% of copy")
        eager = time_cuda(lambda: store._quantize_into(k, v, 0))
        print(f"   eager oscar call (_quantize_into): {eager * 1e3:.1f} us")


if __name__ == "__main__":
    main()
