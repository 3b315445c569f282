"""Whole decode step in one CUDA graph (issue 25): 32 Llama-3.1-8B-shaped attention layers,
append + decode per layer, graph-replayed per token, against a preallocated bf16 cache + SDPA
captured the same way.

    python benchmarks/graph_step.py --out DIR [--quick]

Per (prefill length L, batch B): rows of different lengths in one run (row b holds
``L - (997 b) mod (L / 16)`` prompt tokens), ``--tokens`` (512) decode tokens. One CUDA graph holds
the whole step (32 x (append one token per row, decode_attention)); each replay is one token, so
every flush of the 512 tokens is included (the row-flush launch is issued every step and packs
the rows whose window filled). Reported per token: device ms (CUDA events around the replays,
no L2 flush: a step streams GBs), host us to enqueue one replay, and the ratio to bf16.

bf16 baseline: a preallocated ``[B, 8, L + tokens, 128]`` bf16 K/V per layer, the new token
written at a device position (``index_copy_``), SDPA (flash, GQA) over the whole preallocated
length (what a static cache reads; no mask). Layers whose caches do not fit in memory share
buffers (``distinct`` in the table: layer i uses buffer i mod distinct); every layer still
streams its whole cache from HBM (each is far larger than L2), so the time per token is that of
32 distinct layers. oscar layers share caches the same way when they do not fit (then a shared
cache takes several appends per step: more flushes than a real model, never fewer).

Also ``decode_only`` rows (B=8/16 at 128K): one layer's decode graph-replayed with L2 flushed,
with the plan sized from the exact lengths (the host's bound) and from the capacity (a cache
prepared for capture), to compare with the fixed-length kernel of the sweep (RESULTS.md).

Writes DIR/graph_step.md and DIR/graph_step.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import oscar  # noqa: E402
from gpu_timing import time_graph  # noqa: E402

LAYERS = 32
HQ, H, D = 32, 8, 128
RESIDUAL = oscar.OScaRConfig().residual_length


def row_lens(batch, length):
    return [length - (997 * b) % max(1, length // 16) for b in range(batch)]


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


def _oscar_layers(batch, length, tokens, budget):
    """Caches of rows of different lengths, prepared for capture; as many distinct ones as fit
    in ``budget`` bytes (at least 1)."""
    lens = row_lens(batch, length)
    g = torch.Generator(device="cuda").manual_seed(batch * 7 + length)
    k = torch.randn(batch, H, length, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    first = oscar.quantize_kv(k, v, seq_lens=lens, num_q_heads=HQ)
    del k, v
    per = first.nbytes * (length + tokens + 2 * RESIDUAL) / max(1, length)
    distinct = int(max(1, min(LAYERS, budget // per)))
    share = -(-LAYERS // distinct)  # appends per step of the most shared cache
    cap = length + share * tokens + 2 * RESIDUAL
    caches = [first] + [first.copy() for _ in range(distinct - 1)]
    for c in caches:
        c.prepare_capture(cap)
    return caches, distinct


def _bf16_layers(batch, length, tokens, budget):
    per = 2 * batch * H * (length + tokens) * D * 2
    distinct = int(max(1, min(LAYERS, budget // per)))
    bufs = []
    for _ in range(distinct):
        k = torch.randn(batch, H, length + tokens, D, device="cuda", dtype=torch.bfloat16)
        bufs.append((k, torch.randn_like(k)))
    return bufs, distinct


def _replay(step, tokens):
    """Capture ``step`` (after one eager call) and replay it ``tokens - 1`` times: device ms per
    replay (events around all replays), host us to enqueue one replay."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = tokens - 1
    host = []
    start.record()
    for _ in range(n):
        t0 = time.perf_counter()
        graph.replay()
        host.append(time.perf_counter() - t0)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n, 1e6 * statistics.median(host)


def run_case(batch, length, tokens):
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(1)
    ins = [(torch.randn(batch, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g),
            torch.randn(batch, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g),
            torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g))
           for _ in range(LAYERS)]
    budget = 0.85 * _free_bytes()
    caches, o_distinct = _oscar_layers(batch, length, tokens, budget)

    def oscar_step():
        for i, (k, v, q) in enumerate(ins):
            c = caches[i % len(caches)]
            c.append(k, v)
            oscar.decode_attention(q, c)

    o_ms, o_host = _replay(oscar_step, tokens)
    status = [c.check() is c for c in caches]  # raises on an overflow or a non-finite flush
    lens_after = caches[0].sync_lengths().tolist()
    del caches
    torch.cuda.empty_cache()

    bufs, b_distinct = _bf16_layers(batch, length, tokens, 0.85 * _free_bytes())
    pos = torch.full((1,), length, dtype=torch.long, device="cuda")

    def bf16_step():
        for i, (k, v, q) in enumerate(ins):
            kc, vc = bufs[i % len(bufs)]
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
        pos.add_(1)

    b_ms, b_host = _replay(bf16_step, tokens)
    del bufs
    torch.cuda.empty_cache()
    return dict(batch=batch, prefill=length, tokens=tokens, rows=row_lens(batch, length),
                oscar_ms_per_token=o_ms, oscar_host_us_per_replay=o_host,
                oscar_distinct_layers=o_distinct, oscar_lens_after=lens_after,
                bf16_ms_per_token=b_ms, bf16_host_us_per_replay=b_host,
                bf16_distinct_layers=b_distinct, speedup=b_ms / o_ms, checked=all(status))


def decode_only(batch, length):
    """One layer's decode, graph-replayed with L2 flushed: exact-length plan vs capacity plan."""
    g = torch.Generator(device="cuda").manual_seed(2)
    k = torch.randn(batch, H, length, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    exact = oscar.quantize_kv(k, v, num_q_heads=HQ)
    del k, v
    ms_exact = time_graph(lambda: oscar.decode_attention(q, exact))
    static = exact.copy().prepare_capture(length + 512)
    ms_static = time_graph(lambda: oscar.decode_attention(q, static))
    return dict(batch=batch, seq_len=length, exact_plan_ms=ms_exact,
                capacity_plan_ms=ms_static, capacity=static._store.capacity)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="B=1/8 at 32K only, 128 tokens")
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cases = ([(1, 32768), (8, 32768)] if args.quick else
             [(b, n) for n in (32768, 131072) for b in (1, 8, 16)])
    tokens = 128 if args.quick else args.tokens
    rows, dec = [], []
    for batch, length in cases:
        try:
            r = run_case(batch, length, tokens)
        except torch.cuda.OutOfMemoryError as exc:
            r = dict(batch=batch, prefill=length, error=f"out of memory: {exc}"[:200])
        rows.append(r)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()
    if not args.quick:
        for batch in (8, 16):
            d = decode_only(batch, 131072)
            dec.append(d)
            print(json.dumps(d), flush=True)
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    lines = [f"# graph_step ({datetime.date.today()}, {gpu}, torch {torch.__version__})", "",
             f"{LAYERS} layers x (append + decode), {tokens} tokens graph-replayed, rows of "
             "different lengths; ms/token = device time per replay.", "",
             "| B | prefill | oscar ms/token | bf16 ms/token | speedup | oscar host us/replay "
             "| bf16 host us/replay | distinct layers (oscar / bf16) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['prefill']} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['batch']} | {r['prefill']} | {r['oscar_ms_per_token']:.3f} | "
                     f"{r['bf16_ms_per_token']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['oscar_host_us_per_replay']:.1f} | {r['bf16_host_us_per_replay']:.1f} | "
                     f"{r['oscar_distinct_layers']} / {r['bf16_distinct_layers']} |")
    if dec:
        lines += ["", "Decode only (one layer, L2 flushed, graph replay):", "",
                  "| B | seq_len | exact-length plan ms | capacity plan ms | capacity |",
                  "|---|---|---|---|---|"]
        for d in dec:
            lines.append(f"| {d['batch']} | {d['seq_len']} | {d['exact_plan_ms']:.4f} | "
                         f"{d['capacity_plan_ms']:.4f} | {d['capacity']} |")
    with open(os.path.join(args.out, "graph_step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "graph_step.json"), "w") as f:
        json.dump(dict(gpu=gpu, cases=rows, decode_only=dec), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
