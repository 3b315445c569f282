"""Multi-token decode (q_len > 1: speculative verification, MTP) at GQA 4 and 8: v1 vs the v3 path.

    python benchmarks/multirow.py --out DIR [--shapes 8x32768,8x131072] [--qlens 1,2,4,8,16]
        [--gqas 4,8] [--iters 30]

Llama-3.1-8B-like heads (8 KV heads, head_dim 128, GQA 4 = 32 query heads; GQA 8 = 64 query
heads, the Llama-3-70B ratio), INT2 g32, bfloat16 queries. For every (shape, GQA, q_len) it
times one ``oscar.decode_attention`` call with split kernel v1 everywhere (``SPLIT_VERSION =
1``) and with the default dispatch (``SPLIT_VERSION = 3``: v3, in row groups beyond 8 rows per
KV head, in row blocks beyond 32, v1 where v3 does not take the rows), side by side; for steps
in row blocks also the head-group path they replaced (``MAX_ROW_BLOCKS = 1``: launches over
groups of query heads, each reading the cache again), and for 9-32 rows (row groups) the same
step in row blocks of 8 rows (``ROWS_MAX = 8``: every block the q_len-1 kernel's 8-row layout,
each token lane with its own tiles in flight, the tiles read once per block): device ms of a
CUDA-graph replay
(CUDA events, L2 flushed, median; gpu_timing.time_graph) and of the eager call (includes the
host launch cost; gpu_timing.time_cuda). "x q1" is the new path's graph time over its q_len = 1
time at the same shape and GQA: the issue's goal is <= 1.3 at q_len 4 and <= 1.6 at q_len 8, GQA
8. Bytes: the packed cache a step reads (the same for every q_len) plus q and out.

Writes DIR/multirow.md (the table, with GPU, versions and copy bandwidth) and DIR/multirow.json;
rows are also printed as they are measured. Each new (GQA, q_len, version) compiles its kernels
once (5-10 s each on the GPU machine): ``--warm N`` (default 12) first compiles them in N
processes at once (``oscar.warmup``) into the on-disk kernel cache, from which the timed process
loads them (``--warm 0``: compile in line).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import oscar  # noqa: E402
from cases import HEAD_DIM, NUM_KV_HEADS, decode_inputs  # noqa: E402
from gpu_timing import cache_bytes, copy_bandwidth, time_cuda, time_graph  # noqa: E402
from sweep import environment  # noqa: E402
from oscar.kernels_numba import attention as K  # noqa: E402


def path_name(gqa, q_len):
    """Which split kernel the default dispatch runs for this query shape (INT2 g32 defaults)."""
    rows = gqa * q_len
    cfg = oscar.OScaRConfig()
    why = K._split_v3.unsupported(cfg.key_bits, cfg.value_bits, cfg.value_group_size, HEAD_DIM,
                                  rows, cfg.param_dtype)
    if why is not None:
        return "v1 (fallback)"
    rb = K._split_v3.row_blocks(cfg.key_bits, cfg.value_bits, cfg.value_group_size, HEAD_DIM,
                                rows)
    rg = K._split_v3.row_groups(rows // rb)
    return ("v3" if rg == 1 else f"v3 RG{rg}") + (f" x {rb} row blocks" if rb > 1 else "")


def row_blocked(gqa, q_len):
    """True where the default dispatch runs row blocks (more rows than one v3 block holds)."""
    return "row blocks" in path_name(gqa, q_len)


def _warm(job):
    """Compile (into the on-disk kernel cache) every kernel of one (version, batch, GQA, q_len)
    decode shape; runs in a worker process. 0 for a shape no kernel takes."""
    version, batch, gqa, q_len, limits = job
    K.SPLIT_VERSION = version
    K._split_v3.ROWS_MAX, K._split_v3.MAX_ROW_BLOCKS = limits
    try:
        return oscar.warmup(num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                            num_q_heads=NUM_KV_HEADS * gqa, dtype="bfloat16",
                            batch_sizes=(batch,), q_lens=(q_len,))["compiled"]
    except ValueError:
        return 0


def warm(jobs, workers):
    """The kernels of ``jobs`` compiled in ``workers`` processes (each its own CUDA context)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return sum(pool.map(_warm, jobs))


def measure(q, cache, version, iters, limits=None):
    """Graph and eager ms of one decode call with split kernel ``version``; None where the
    configuration is refused (ValueError: v1 has no kernel for 64 rows at head_dim 128).
    ``limits``: (attention_mma.ROWS_MAX, MAX_ROW_BLOCKS) for this call (HEAD_GROUPS,
    BLOCKS_OF_8; default the library's)."""
    K.SPLIT_VERSION = version
    K._split_v3.ROWS_MAX, K._split_v3.MAX_ROW_BLOCKS = limits or DEFAULT
    fn = lambda: oscar.decode_attention(q, cache)  # noqa: E731
    try:
        out = fn().float()  # compiles (and checks the call) before timing
    except ValueError as exc:
        print(f"v{version} q {tuple(q.shape)}: {exc}", flush=True)
        return None
    torch.cuda.synchronize()
    return dict(graph=time_graph(fn, iters=iters, graphs=2), eager=time_cuda(fn, iters=iters),
                out=out)


#: (rows a v3 block holds, most row blocks): the library's, head groups instead of row blocks,
#: and row blocks of 8 rows instead of row groups
DEFAULT = (K._split_v3.ROWS_MAX, K._split_v3.MAX_ROW_BLOCKS)
HEAD_GROUPS = (K._split_v3.ROWS_MAX, 1)
BLOCKS_OF_8 = (K._split_v3.ROWS_PER_WARP, K._split_v3.MAX_ROW_BLOCKS)


def row_grouped(gqa, q_len):
    """True where the default dispatch runs one block in row groups (9-32 rows)."""
    return "RG" in path_name(gqa, q_len) and not row_blocked(gqa, q_len)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="multirow_out")
    ap.add_argument("--shapes", default="8x32768,8x131072")
    ap.add_argument("--qlens", default="1,2,4,8,16")
    ap.add_argument("--gqas", default="4,8")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warm", type=int, default=12, help="compile processes (0: in line)")
    ap.add_argument("--warm-only", action="store_true", help="compile the kernels, time nothing")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    gqas = [int(x) for x in args.gqas.split(",")]
    qlens = [int(x) for x in args.qlens.split(",")]
    if args.warm > 0:
        t0 = time.perf_counter()
        batches = sorted({b for b, _ in shapes})
        jobs = [(v, b, g, lq, DEFAULT) for b in batches for g in gqas for lq in qlens
                for v in (1, 3)]
        jobs += [(3, b, g, lq, HEAD_GROUPS) for b in batches for g in gqas for lq in qlens
                 if row_blocked(g, lq)]
        jobs += [(3, b, g, lq, BLOCKS_OF_8) for b in batches for g in gqas for lq in qlens
                 if row_grouped(g, lq)]
        n = warm(jobs, min(args.warm, len(jobs)))
        print(f"warm-up: {n} kernels compiled in {time.perf_counter() - t0:.1f} s "
              f"({args.warm} processes)", flush=True)
    if args.warm_only:
        return
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    copy = copy_bandwidth()
    print(f"{env['gpu']}: copy bandwidth {copy:.2f} TB/s", flush=True)
    saved = K.SPLIT_VERSION
    rows = []
    try:
        for b, t in shapes:
            _, k, v = decode_inputs(b, t, seed=t + b)
            # one cache per split version: a cache keeps the launch plans of each step shape,
            # built with the SPLIT_VERSION of its first call
            caches = {ver: oscar.quantize_kv(k, v) for ver in (1, 3, "hg", "b8")}
            del k, v
            nbytes = cache_bytes(caches[3])
            for gqa in gqas:
                base = None
                g = torch.Generator(device="cuda").manual_seed(gqa)
                q_all = torch.randn(b, NUM_KV_HEADS * gqa, max(qlens), HEAD_DIM, device="cuda",
                                    dtype=torch.bfloat16, generator=g)
                for q_len in qlens:
                    q = q_all[:, :, :q_len].contiguous()
                    # the default dispatch's path, under the library's row limits (measure()
                    # changes them for the variants)
                    K._split_v3.ROWS_MAX, K._split_v3.MAX_ROW_BLOCKS = DEFAULT
                    path = path_name(gqa, q_len)
                    blocked, grouped = row_blocked(gqa, q_len), row_grouped(gqa, q_len)
                    old = measure(q, caches[1], 1, args.iters)
                    new = measure(q, caches[3], 3, args.iters)
                    hg = (measure(q, caches["hg"], 3, args.iters, HEAD_GROUPS)
                          if blocked else None)
                    b8 = (measure(q, caches["b8"], 3, args.iters, BLOCKS_OF_8)
                          if grouped else None)
                    row = dict(batch=b, seq_len=t, gqa=gqa, q_len=q_len, rows=gqa * q_len,
                               path=path if new else "unsupported")
                    if new:
                        base = new["graph"] if q_len == 1 else base
                        io = 2 * q.numel() * q.element_size()
                        tbps = (nbytes + io) / (new["graph"] * 1e-3) / 1e12
                        row.update(new_ms=new["graph"], new_eager_ms=new["eager"],
                                   vs_q1=None if base is None else new["graph"] / base,
                                   tbps=tbps, share=tbps / copy)
                    if old:
                        row.update(v1_ms=old["graph"], v1_eager_ms=old["eager"])
                    if hg and new:
                        row.update(hg_ms=hg["graph"], hg_eager_ms=hg["eager"],
                                   vs_hg=hg["graph"] / new["graph"],
                                   hg_diff=float((new["out"] - hg["out"]).abs().max()))
                    if b8 and new:
                        row.update(b8_ms=b8["graph"], b8_eager_ms=b8["eager"],
                                   vs_b8=b8["graph"] / new["graph"],
                                   b8_diff=float((new["out"] - b8["out"]).abs().max()))
                    if old and new:
                        row.update(speedup=old["graph"] / new["graph"],
                                   max_diff=float((new["out"] - old["out"]).abs().max()))
                    rows.append(row)
                    print(row, flush=True)
    finally:
        K.SPLIT_VERSION = saved
        K._split_v3.ROWS_MAX, K._split_v3.MAX_ROW_BLOCKS = DEFAULT
    with open(os.path.join(args.out, "multirow.json"), "w") as f:
        json.dump(dict(env=env, copy_tbps=copy, rows=rows), f, indent=1)
    lines = [f"Date {env['date']}; GPU {env['gpu']}; torch {env['torch']}; numba {env['numba']}; "
             f"numpy {env['numpy']}; copy bandwidth {copy:.2f} TB/s (read + write).", "",
             "Llama-3.1-8B-like KV (8 heads x 128, INT2 g32), bfloat16 q. ms: device time of one "
             "decode call replayed from a CUDA graph (L2 flushed, median); eager: launched from "
             "Python. v1: split kernel v1 for every shape; new: the default dispatch (path). "
             "x q1: new ms over new ms at q_len 1 (same shape and GQA). TB/s: packed bytes + q + "
             "out over the new path's time. max diff: max |out_new - out_v1|. Row blocks: "
             "head groups ms = the same step as launches over groups of query heads "
             "(MAX_ROW_BLOCKS = 1), and its time over the row blocks'. Row groups: blocks of 8 "
             "ms = the same step in row blocks of 8 rows (ROWS_MAX = 8).", "",
             "| batch | seq_len | GQA | q_len | rows | path | v1 ms | new ms | speedup | x q1 | "
             "v1 eager ms | new eager ms | TB/s (% of copy) | max diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, name, fmt):
        return "-" if r.get(name) is None else fmt.format(r[name])

    for r in rows:
        tb = "-" if "tbps" not in r else f"{r['tbps']:.2f} ({100 * r['share']:.0f}%)"
        lines.append(f"| {r['batch']} | {r['seq_len']} | {r['gqa']} | {r['q_len']} | {r['rows']} "
                     f"| {r['path']} | {cell(r, 'v1_ms', '{:.4f}')} | "
                     f"{cell(r, 'new_ms', '{:.4f}')} | {cell(r, 'speedup', '{:.2f}x')} | "
                     f"{cell(r, 'vs_q1', '{:.2f}x')} | {cell(r, 'v1_eager_ms', '{:.4f}')} | "
                     f"{cell(r, 'new_eager_ms', '{:.4f}')} | {tb} | "
                     f"{cell(r, 'max_diff', '{:.1e}')} |")
    lines += comparison(rows, "hg", "row blocks", "head groups")
    lines += comparison(rows, "b8", "row groups", "blocks of 8")
    with open(os.path.join(args.out, "multirow.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def comparison(rows, tag, ours, theirs):
    """Table lines of the rows measured with the variant ``tag`` ("hg": head groups, "b8": row
    blocks of 8) beside the default dispatch (``ours``): both graph times, their ratio, both
    eager times, the largest output difference."""
    picked = [r for r in rows if r.get(f"{tag}_ms") is not None]
    if not picked:
        return []
    out = ["", f"| batch | seq_len | GQA | q_len | rows | {ours} ms | {theirs} ms | "
           f"{theirs} / {ours} | eager ({ours} / {theirs}) | max diff |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in picked:
        out.append(f"| {r['batch']} | {r['seq_len']} | {r['gqa']} | {r['q_len']} | "
                   f"{r['rows']} | {r['new_ms']:.4f} | {r[tag + '_ms']:.4f} | "
                   f"{r['vs_' + tag]:.2f}x | {r['new_eager_ms']:.4f} / "
                   f"{r[tag + '_eager_ms']:.4f} | {r[tag + '_diff']:.1e} |")
    return out


if __name__ == "__main__":
    main()
