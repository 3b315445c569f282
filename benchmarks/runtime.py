"""What a user calling oscar from Python gets on a GPU: cold start, host cost, eager steps.

    python benchmarks/runtime.py --out DIR [--quick] [--skip cold,host,eager,loop,growth]

Sections (Llama-3.1-8B attention shapes: 32 query heads, 8 KV heads, head_dim 128, bfloat16):

* cold: a fresh process with an empty kernel cache, then one with the cache it left: wall
  seconds from ``import oscar`` to the first ``quantize_kv`` (32K prefill, B=1), the first decode
  output, and the first flush in a decode loop.
* host: host microseconds per eager step (``append`` of one token + ``decode_attention``) at
  B=1 and B=8 (4K prefill), with launch plans and through Numba's dispatcher
  (``OSCAR_LAUNCH_PLANS=0`` path), and the parts.
* eager: one eager decode step as a user times it (CUDA events around the Python call, L2
  flushed) vs the same step replayed from a CUDA graph vs SDPA bf16 eager, at the sweep's shapes.
* loop: a 32-layer eager decode loop (append + decode every layer) for 256 tokens from a 32K
  prefill, crossing flushes, in ms per token (wall clock), vs a preallocated bf16 cache with
  SDPA (``index_copy_`` of the new token + SDPA over the valid prefix).
* growth: the wall time of the decode loop's first flush (into reserved room), of a later one,
  and of the step whose flush doubles the capacity, vs a normal step.

Writes DIR/runtime.json and DIR/runtime.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import oscar  # noqa: E402
from cases import HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, decode_inputs  # noqa: E402
from gpu_timing import host_us_per_call, sdpa_bf16, time_cuda, time_graph  # noqa: E402

COLD = r"""
import json, time
t0 = time.perf_counter()
import torch
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
t_ctx = time.perf_counter()
import oscar
from oscar.kernels_numba import kernel_cache as kc
t_imp = time.perf_counter()
g = torch.Generator(device="cuda").manual_seed(0)
k = torch.randn(1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16, generator=g)
v = torch.randn_like(k)
q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
torch.cuda.synchronize()
t1 = time.perf_counter()
cache = oscar.quantize_kv(k, v, num_q_heads=32)
torch.cuda.synchronize(); t2 = time.perf_counter()
out = oscar.decode_attention(q, cache); torch.cuda.synchronize(); t3 = time.perf_counter()
worst = 0.0
for i in range(129):  # crosses one flush
    s = time.perf_counter()
    cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    oscar.decode_attention(q, cache)
    torch.cuda.synchronize()
    worst = max(worst, time.perf_counter() - s)
print(json.dumps({"torch_cuda_init_s": t_ctx - t0, "import_s": t_imp - t_ctx,
                  "first_quantize_s": t2 - t1, "first_decode_s": t3 - t2,
                  "import_to_first_decode_s": (t_imp - t_ctx) + (t3 - t1),
                  "worst_step_with_flush_s": worst, "compiled": kc.stats["misses"],
                  "loaded": kc.stats["hits"]}))
"""


def cold_start(out, profile_dir=None):
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, OSCAR_CACHE_DIR=d)
        rows = []
        for label in ("empty kernel cache", "warm kernel cache"):
            proc = subprocess.run([sys.executable, "-c", COLD], env=env, capture_output=True,
                                  text=True, timeout=900)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            rows.append(dict(case=label, **json.loads(proc.stdout.strip().splitlines()[-1])))
        if profile_dir:  # where the warm start's time goes (cProfile, cumulative)
            script = ("import cProfile, pstats, io\npr = cProfile.Profile(); pr.enable()\n"
                      + COLD + "\npr.disable(); s = io.StringIO()\n"
                      "pstats.Stats(pr, stream=s).sort_stats('cumulative').print_stats(45)\n"
                      f"open({os.path.join(profile_dir, 'cold_profile.txt')!r}, 'w')"
                      ".write(s.getvalue())\n")
            subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=900)
    out["cold"] = rows


def _host_loop(cache, q, kn, vn, n=300):
    """Host us per (append + decode) and per part; the queue is drained between parts. A first
    untimed pass of 2 windows builds what a loop builds once (the plans of the step variants
    with and without residual tokens, after a flush): steady state, as a generate loop sees it
    after its first tokens."""
    for _ in range(2 * cache.config.residual_length):
        cache.append(kn, vn)
        oscar.decode_attention(q, cache)
    torch.cuda.synchronize()
    step = host_us_per_call(lambda: (cache.append(kn, vn), oscar.decode_attention(q, cache)), n)
    dec = host_us_per_call(lambda: oscar.decode_attention(q, cache), n)
    app = host_us_per_call(lambda: cache.append(kn, vn), n)
    return step, dec, app


def host_cost(out, profile_dir=None):
    rows = []
    for batch in (1, 8):
        q, k, v = decode_inputs(batch, 4096, seed=batch)
        kn, vn = k[:, :, :1].clone(), v[:, :, :1].clone()
        for plans in (True, False):
            cache = oscar.quantize_kv(k, v, num_q_heads=NUM_Q_HEADS, max_seq_len=8192)
            cache._store.plans = plans
            step, dec, app = _host_loop(cache, q, kn, vn)
            rows.append(dict(batch=batch, path="plans" if plans else "dispatcher",
                             step_us=step, decode_us=dec, append_us=app))
            if profile_dir and plans and batch == 8:
                import cProfile
                import io
                import pstats

                pr = cProfile.Profile()
                pr.enable()
                _host_loop(cache, q, kn, vn, n=200)
                pr.disable()
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
                with open(os.path.join(profile_dir, "step_profile.txt"), "w") as f:
                    f.write(s.getvalue())
    # the torch floor: two small torch ops, the cost of any eager call through torch
    x = torch.zeros(8, device="cuda")
    t0 = time.perf_counter()
    for _ in range(1000):
        x.add_(1)
    floor = (time.perf_counter() - t0) / 1000 * 1e6
    torch.cuda.synchronize()
    out["host"] = rows
    out["torch_op_us"] = floor


def eager_steps(out, cases):
    rows = []
    for batch, seq_len in cases:
        q, k, v = decode_inputs(batch, seq_len, seed=seq_len + batch)
        cache = oscar.quantize_kv(k, v, num_q_heads=NUM_Q_HEADS)
        fn = lambda: oscar.decode_attention(q, cache)  # noqa: E731
        eager = time_cuda(fn)
        graph = time_graph(fn)
        sdpa = time_cuda(lambda: sdpa_bf16(q, k, v))
        rows.append(dict(batch=batch, seq_len=seq_len, eager_ms=eager, graph_ms=graph,
                         sdpa_ms=sdpa, eager_over_graph=eager / graph,
                         eager_speedup=sdpa / eager, graph_speedup=sdpa / graph))
        del q, k, v, cache
        torch.cuda.empty_cache()
    out["eager"] = rows


def decode_loop(out, batches, layers=32, prefill=32768, tokens=256):
    rows = []
    for batch in batches:
        q, k, v = decode_inputs(batch, prefill, seed=7)
        kn = torch.randn(tokens, batch, NUM_KV_HEADS, 1, HEAD_DIM, device="cuda",
                         dtype=torch.bfloat16)
        qs = torch.randn(tokens, batch, NUM_Q_HEADS, 1, HEAD_DIM, device="cuda",
                         dtype=torch.bfloat16)
        # oscar: one cache per layer (same prefill data: speed does not depend on values)
        caches = [oscar.quantize_kv(k, v, num_q_heads=NUM_Q_HEADS) for _ in range(layers)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in range(tokens):
            for c in caches:
                c.append(kn[t], kn[t])
                oscar.decode_attention(qs[t], c)
        torch.cuda.synchronize()
        oscar_ms = (time.perf_counter() - t0) / tokens * 1e3
        mem_oscar = sum(c.nbytes for c in caches)
        del caches
        torch.cuda.empty_cache()
        # bf16: preallocated [B, H, prefill + tokens, D] per layer, SDPA over the valid prefix
        total = prefill + tokens
        kc = [torch.empty(batch, NUM_KV_HEADS, total, HEAD_DIM, device="cuda",
                          dtype=torch.bfloat16) for _ in range(layers)]
        vc = [torch.empty_like(x) for x in kc]
        for x, y in zip(kc, vc):
            x[:, :, :prefill].copy_(k)
            y[:, :, :prefill].copy_(v)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in range(tokens):
            n = prefill + t
            pos = torch.tensor([n], device="cuda")
            for x, y in zip(kc, vc):
                x.index_copy_(2, pos, kn[t])
                y.index_copy_(2, pos, kn[t])
                sdpa_bf16(qs[t], x[:, :, :n + 1], y[:, :, :n + 1])
        torch.cuda.synchronize()
        bf16_ms = (time.perf_counter() - t0) / tokens * 1e3
        mem_bf16 = sum(x.numel() * 2 * 2 for x in kc)
        del kc, vc, q, k, v
        torch.cuda.empty_cache()
        rows.append(dict(batch=batch, layers=layers, prefill=prefill, tokens=tokens,
                         oscar_ms_per_token=oscar_ms, bf16_ms_per_token=bf16_ms,
                         speedup=bf16_ms / oscar_ms, oscar_kv_gb=mem_oscar / 1e9,
                         bf16_kv_gb=mem_bf16 / 1e9))
    out["loop"] = rows


def growth(out):
    rows = []
    for batch in (1, 8):
        q, k, v = decode_inputs(batch, 32768, seed=3)
        # capacity: the prompt + 2 windows (max_seq_len): the 128th append flushes into reserved
        # room (the loop's first flush), the 256th too, the 384th needs a reallocation
        r = oscar.OScaRConfig().residual_length
        cache = oscar.quantize_kv(k, v, num_q_heads=NUM_Q_HEADS, max_seq_len=32768 + 2 * r)
        kn = k[:, :, :1].clone()
        times = []
        for i in range(3 * r + 16):
            torch.cuda.synchronize()
            s = time.perf_counter()
            cache.append(kn, kn)
            oscar.decode_attention(q, cache)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - s) * 1e3)
        first_flush, second_flush, grow_step = times[r - 1], times[2 * r - 1], times[3 * r - 1]
        # where a growth's time goes: the reallocation + copy, then the first step after it
        # (its launch plans are rebuilt for the new buffers)
        st = cache._store

        def timed(fn):
            torch.cuda.synchronize()
            s = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - s) * 1e3

        alloc_ms = timed(lambda: st._alloc(st.capacity * 2))
        first_ms = timed(lambda: oscar.decode_attention(q, cache))
        next_ms = timed(lambda: oscar.decode_attention(q, cache))
        rows.append(dict(batch=batch, first_flush_step_ms=first_flush,
                         second_flush_step_ms=second_flush, growth_step_ms=grow_step,
                         median_step_ms=statistics.median(times),
                         capacity=cache._store.capacity, realloc_ms=alloc_ms,
                         first_decode_after_ms=first_ms, next_decode_ms=next_ms))
    out["growth"] = rows


def markdown(out) -> str:
    lines = [f"# Runtime ({out['gpu']}, {out['date']})", ""]
    if "cold" in out:
        lines += ["| cold start | import | first quantize_kv (32K) | first decode | import -> "
                  "first decode | worst step with flush | compiled | loaded |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in out["cold"]:
            lines.append(f"| {r['case']} | {r['import_s']:.2f} s | {r['first_quantize_s']:.2f} s"
                         f" | {r['first_decode_s']:.3f} s | {r['import_to_first_decode_s']:.2f} s"
                         f" | {r['worst_step_with_flush_s'] * 1e3:.1f} ms | {r['compiled']} | "
                         f"{r['loaded']} |")
        lines.append("")
    if "host" in out:
        lines += ["| host us | B | append + decode | decode | append |", "|---|---|---|---|---|"]
        for r in out["host"]:
            lines.append(f"| {r['path']} | {r['batch']} | {r['step_us']:.1f} | "
                         f"{r['decode_us']:.1f} | {r['append_us']:.1f} |")
        lines += [f"(one small torch op: {out['torch_op_us']:.1f} us)", ""]
    if "eager" in out:
        lines += ["| B | T | eager ms | graph ms | SDPA bf16 ms | eager/graph | eager speedup |"
                  " graph speedup |", "|---|---|---|---|---|---|---|---|"]
        for r in out["eager"]:
            lines.append(f"| {r['batch']} | {r['seq_len']} | {r['eager_ms']:.4f} | "
                         f"{r['graph_ms']:.4f} | {r['sdpa_ms']:.4f} | {r['eager_over_graph']:.2f}"
                         f" | {r['eager_speedup']:.2f}x | {r['graph_speedup']:.2f}x |")
        lines.append("")
    if "loop" in out:
        lines += ["| 32-layer loop B | oscar ms/token | bf16 SDPA ms/token | speedup | KV GB oscar"
                  " | KV GB bf16 |", "|---|---|---|---|---|---|"]
        for r in out["loop"]:
            lines.append(f"| {r['batch']} | {r['oscar_ms_per_token']:.3f} | "
                         f"{r['bf16_ms_per_token']:.3f} | {r['speedup']:.2f}x | "
                         f"{r['oscar_kv_gb']:.2f} | {r['bf16_kv_gb']:.2f} |")
        lines.append("")
    if "growth" in out:
        lines += ["| growth B | first flush step ms | second flush step ms | step with growth ms"
                  " | median step ms | realloc ms | first decode after ms | next decode ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in out["growth"]:
            lines.append(f"| {r['batch']} | {r.get('first_flush_step_ms', float('nan')):.2f} | "
                         f"{r.get('second_flush_step_ms', float('nan')):.2f} | "
                         f"{r['growth_step_ms']:.2f} | "
                         f"{r['median_step_ms']:.3f} | {r['realloc_ms']:.2f} | "
                         f"{r['first_decode_after_ms']:.2f} | {r['next_decode_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runtime_out")
    p.add_argument("--quick", action="store_true", help="fewer shapes, B=1 loop only")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--profile", action="store_true",
                   help="also write cProfile listings of the warm cold start and of a B=8 step")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    import datetime

    out = dict(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat())
    cases = ([(1, 4096), (1, 32768), (8, 32768)] if args.quick else
             [(1, 4096), (1, 32768), (8, 32768), (8, 131072), (16, 131072)])
    steps = [("host", lambda: host_cost(out, args.out if args.profile else None)),
             ("growth", lambda: growth(out)),
             ("eager", lambda: eager_steps(out, cases)),
             ("cold", lambda: cold_start(out, args.out if args.profile else None)),
             ("loop", lambda: decode_loop(out, (1,) if args.quick else (1, 8)))]
    for name, fn in steps:
        if name in skip:
            continue
        t0 = time.perf_counter()
        fn()
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        with open(os.path.join(args.out, "runtime.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(args.out, "runtime.md"), "w") as f:
            f.write(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
