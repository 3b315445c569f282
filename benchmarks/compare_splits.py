"""Decode attention with each split kernel against torch SDPA bf16, same shapes, same run (GPU).

    python benchmarks/compare_splits.py [--versions 1,3,3@128] [--shapes 1x4096,8x131072] \
        [--bits 2]

Versions: ``1`` is split kernel v1 (attention_v1.py) everywhere, ``3`` the tensor-core v3 where
it applies (``attention.SPLIT_VERSIONS``; v2 was removed on 2026-12-07). ``3@128`` is split
kernel v3 compiled with a register cap of 128 (``V3_MAX_REGISTERS``); a trailing ``m`` (``3m``,
``3@128m``) has the merge kernel score the residual tokens (``RESIDUAL_BLOCKS = "off"``), a
trailing ``r`` the v3 kernel's residual blocks (``"on"``); neither: ``"auto"``; a ``u`` a
separate merge launch instead of the fused merge (``FUSED_MERGE = False``). A shape ``BxT``
quantizes ``T // 128 * 128`` tokens and keeps ``T % 128`` residual ones (``1x4223``: 127
residual tokens).

Llama-3.1-8B heads (32 query, 8 KV, head_dim 128), one query token, bfloat16 inputs. Prints one
line per (shape, version): device ms of a CUDA-graph replay of one decode call (CUDA events, L2
flushed, median; the eager time, which includes host launch cost, in parentheses), the speedup
over SDPA,
the packed bytes read, TB/s and share of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import oscar  # noqa: E402
from cases import decode_inputs  # noqa: E402
from gpu_timing import (cache_bytes, copy_bandwidth, graph_host_us_per_replay,  # noqa: E402
                        host_us_per_call, sdpa_bf16, time_cuda, time_graph)
from oscar.kernels_numba import attention as K  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--versions", default="1,3")
    ap.add_argument("--shapes", default="1x4096,1x32768,8x32768,8x131072,16x131072")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--host", action="store_true", help="also eager host us/call, graph replay us")
    args = ap.parse_args(argv)
    versions = args.versions.split(",")
    for ver in versions:
        if int(ver.rstrip("mru").partition("@")[0]) not in K.SPLIT_VERSIONS:
            ap.error(f"--versions: {ver} is not a split kernel version {K.SPLIT_VERSIONS}")
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.2f} TB/s", flush=True)
    cfg = oscar.OScaRConfig(key_bits=args.bits, value_bits=args.bits)
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        q, k, v = decode_inputs(b, t, seed=t + b)
        cache = oscar.quantize_kv(k, v, cfg)
        sdpa_ms = time_cuda(lambda: sdpa_bf16(q, k, v))
        nbytes = cache_bytes(cache)
        ref = None
        for ver in versions:
            flags = ver.lstrip("0123456789@")
            K.RESIDUAL_BLOCKS = "off" if "m" in flags else "on" if "r" in flags else "auto"
            K.FUSED_MERGE = "u" not in flags
            num, _, cap = ver.rstrip("mru").partition("@")
            K.SPLIT_VERSION = int(num)
            K.V3_MAX_REGISTERS = int(cap) if cap else None
            out = oscar.decode_attention(q, cache).float()
            err = 0.0 if ref is None else float((out - ref).abs().max())
            ref = out if ref is None else ref
            eager = time_cuda(lambda: oscar.decode_attention(q, cache))
            ms = time_graph(lambda: oscar.decode_attention(q, cache))
            tbps = nbytes / (ms * 1e-3) / 1e12
            print(f"B={b:3d} T={t:7d} v{ver}: graph {ms:.4f} ms (eager {eager:.4f})  SDPA "
                  f"{sdpa_ms:.4f} ms  speedup {sdpa_ms / ms:5.2f}x  {nbytes / 1e6:7.1f} MB  "
                  f"{tbps:.2f} TB/s ({100 * tbps / copy:.0f}% of copy)  "
                  f"max|out - v{versions[0]}| {err:.2e}", flush=True)
            if args.host:
                fn = lambda: oscar.decode_attention(q, cache)  # noqa: E731
                print(f"    host: eager {host_us_per_call(fn):.1f} us/call, graph replay "
                      f"{graph_host_us_per_replay(fn):.1f} us/replay (enqueue)", flush=True)


if __name__ == "__main__":
    main()
