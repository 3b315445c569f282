"""Decode sweep on the GPU: oscar INT2/INT4 vs torch SDPA bf16, written as a table and a plot.

    python benchmarks/sweep.py --out DIR [--quick]

Writes DIR/sweep.md (markdown table with date, GPU, driver, versions), DIR/sweep.json and
DIR/speedup.png (speedup vs seq_len per batch size, with the ~5.1x byte-ratio ceiling drawn).
All times: device time from CUDA events, L2 flushed, median (gpu_timing.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import oscar  # noqa: E402
from cases import HEAD_DIM, NUM_KV_HEADS, decode_inputs  # noqa: E402
from gpu_timing import (cache_bytes, copy_bandwidth, graph_host_us_per_replay,  # noqa: E402
                        host_us_per_call, sdpa_bf16, time_cuda, time_graph)

CEILING = 16 / 3.03  # bf16 bits over INT2 g32 fp16-param bits per element (K and V, + norms)
RESIDUAL = oscar.OScaRConfig().residual_length  # the default residual window, 128 tokens


def environment() -> dict:
    import numba
    import numpy

    drv = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return dict(date=datetime.date.today().isoformat(), gpu=drv, torch=torch.__version__,
                numba=numba.__version__, numpy=numpy.__version__, oscar=oscar.__version__)


def decode_row(batch, seq_len, bits, copy_tbps, host=False):
    cfg = oscar.OScaRConfig(key_bits=bits, value_bits=bits)
    q, k, v = decode_inputs(batch, seq_len, seed=seq_len + batch)
    cache = oscar.quantize_kv(k, v, cfg)
    fn = lambda: oscar.decode_attention(q, cache)  # noqa: E731
    ms = time_graph(fn)  # device time of one decode step (both kernels), no host launch cost
    eager_ms = time_cuda(fn)
    sdpa_ms = time_cuda(lambda: sdpa_bf16(q, k, v))
    nbytes = cache_bytes(cache) + 2 * q.numel() * 2
    tbps = nbytes / (ms * 1e-3) / 1e12
    sdpa_tbps = (2 * k.numel() * 2 + 2 * q.numel() * 2) / (sdpa_ms * 1e-3) / 1e12
    row = dict(batch=batch, seq_len=seq_len, residual=cache.residual_len, bits=bits, oscar_ms=ms,
               eager_ms=eager_ms, sdpa_ms=sdpa_ms,
               speedup=sdpa_ms / ms, bytes=nbytes, tbps=tbps, share=tbps / copy_tbps,
               sdpa_tbps=sdpa_tbps)
    if host:
        row["host_us"] = host_us_per_call(fn)
        row["graph_us"] = graph_host_us_per_replay(fn)
    return row


def quantize_row(tokens, copy_tbps):
    k = torch.randn(1, NUM_KV_HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cache = oscar.quantize_kv(k, v)

    def fn():
        cache._store._quantize_into(k, v, 0)

    ms = time_graph(fn)  # device time of the launch (a graph replay: no host cost)
    nbytes = 2 * k.numel() * 2 + cache.nbytes
    tbps = nbytes / (ms * 1e-3) / 1e12
    return dict(tokens=tokens, ms=ms, eager_ms=time_cuda(fn), bytes=nbytes, tbps=tbps,
                share=tbps / copy_tbps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="sweep_out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    copy_tbps = copy_bandwidth()
    batches = [1, 8] if args.quick else [1, 8, 16]
    lens = [4096, 32768, 131072] if args.quick else [1024, 4096, 16384, 32768, 65536, 131072]
    rows = []
    cases = [(b, t, 2, b == 1 and t == 32768) for b in batches for t in lens
             if b * t <= 16 * 131072]
    if args.quick:  # the other 128K case (the full sweep has it in the loop above)
        cases.append((16, 131072, 2, False))
    cases.append((8, 131072, 4, False))
    # a full residual window: 127 unquantized tokens (the worst case of a decode loop, which
    # cycles through 0..127; the rows above have none)
    cases += [(b, t + RESIDUAL - 1, 2, False) for b, t in [(1, 4096), (1, 32768), (8, 32768),
                                                            (8, 131072)]]
    # rows.jsonl gets each row as it is measured: a run cut short by a time limit keeps them
    with open(os.path.join(args.out, "rows.jsonl"), "w") as partial:
        for b, t, bits, host in cases:
            row = decode_row(b, t, bits, copy_tbps, host=host)
            rows.append(row)
            print(row, flush=True)
            partial.write(json.dumps(row) + "\n")
            partial.flush()
    quant = [quantize_row(128, copy_tbps), quantize_row(32768, copy_tbps)]
    result = dict(env=env, copy_tbps=copy_tbps, decode=rows, quantize=quant)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"Date {env['date']}; GPU {env['gpu']}; torch {env['torch']}; numba {env['numba']}; "
             f"numpy {env['numpy']}; copy bandwidth {copy_tbps:.2f} TB/s (read + write).", "",
             "oscar ms: device time of one decode step replayed from a CUDA graph (split + merge "
             "kernels; median of 3 captures x 50 replays); eager: the same call launched from "
             "Python (includes host launch cost).",
             "packed bytes: what a step reads (codes, params, norms and the residual tokens). "
             "residual: unquantized tokens in the cache (seq_len mod 128).",
             "", "| batch | seq_len | residual | bits | oscar ms | eager ms | SDPA bf16 ms | "
             "speedup | packed bytes | TB/s | % of copy | SDPA TB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['seq_len']} | {r['residual']} | {r['bits']} | "
                     f"{r['oscar_ms']:.4f} | "
                     f"{r['eager_ms']:.4f} | {r['sdpa_ms']:.4f} | {r['speedup']:.2f}x | "
                     f"{r['bytes'] / 1e6:.1f} MB | {r['tbps']:.2f} | {100 * r['share']:.0f}% | "
                     f"{r['sdpa_tbps']:.2f} |")
    for r in rows:
        if "host_us" in r:
            lines += ["", f"Host cost of one decode step (B={r['batch']}, T={r['seq_len']}): eager "
                      f"{r['host_us']:.1f} us/call; CUDA graph replay {r['graph_us']:.1f} us to "
                      "enqueue (host side)."]
    lines += ["", "Quantize (bfloat16 K and V of 8 heads x 128 in, packed out): ms = device time of "
              "one launch replayed from a CUDA graph; eager ms includes the host cost.", "",
              "| quantize tokens | ms | eager ms | bytes (read + written) | TB/s | % of copy |",
              "|---|---|---|---|---|---|"]
    for r in quant:
        lines.append(f"| {r['tokens']} | {r['ms']:.4f} | {r['eager_ms']:.4f} | "
                     f"{r['bytes'] / 1e6:.1f} MB | {r['tbps']:.2f} | {100 * r['share']:.0f}% |")
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for b in batches:
            pts = [(r["seq_len"], r["speedup"]) for r in rows
                   if r["batch"] == b and r["bits"] == 2 and r["residual"] == 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"INT2, batch {b}")
        ax.axhline(CEILING, ls="--", color="gray", label=f"byte-ratio ceiling {CEILING:.1f}x")
        ax.axhline(1.0, ls=":", color="black")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("seq_len")
        ax.set_ylabel("speedup over SDPA bf16")
        ax.set_title(f"oscar decode vs SDPA bf16 ({env['gpu'].split(',')[0]})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "speedup.png"), dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
