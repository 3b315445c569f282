"""Where does one decode step spend its time? Host profile (cProfile) and a kernel run for ncu.

    python benchmarks/profile_decode.py host [--batch B --seq-len T]
    ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \
        python benchmarks/profile_decode.py kernels
"""

import argparse
import cProfile
import pstats

import torch

import oscar

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["host", "kernels"])
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--seq-len", type=int, default=32768)
args = ap.parse_args()

k = torch.randn(args.batch, 8, args.seq_len, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
q = torch.randn(args.batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
cache = oscar.quantize_kv(k, v)
for _ in range(3):
    oscar.decode_attention(q, cache)
torch.cuda.synchronize()
if args.mode == "host":
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(100):
        oscar.decode_attention(q, cache)
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(35)
else:
    oscar.decode_attention(q, cache)
    torch.cuda.synchronize()
