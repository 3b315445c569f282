"""End-to-end generate() on a GPU: OScaRCache vs transformers' own caches.

    python benchmarks/generate.py --out DIR [--cases 1x8192,8x8192,1x32768] [--new 64]
                                  [--kinds dynamic,oscar,static,quanto2,quanto4,hqq2,hqq4]

Kinds: ``oscar`` (OScaRCache, eager), ``oscar_graph`` (``graphed_generate``: OScaRCache with
each decode step replayed from one CUDA graph; its capture, once per call, is inside the timed
``generate`` of N tokens), ``dynamic`` (DynamicCache + SDPA bf16, eager), ``static``
(``cache_implementation="static"``: a preallocated bf16 cache whose decode step transformers
compiles with torch.compile), ``quanto2/4`` and ``hqq2/4`` (``cache_implementation="quantized"``,
transformers' QuantizedCache with the optimum-quanto or HQQ backend at 2/4 bits; their packages
must be installed, on the device machine as carried wheels: a missing one is reported, not
fatal).

A Llama-3.1-8B configuration with random bf16 weights (speed does not depend on the weights):
32 layers, 32 query heads, 8 KV heads, head_dim 128. For each (batch, prompt length) it runs
``generate(max_new_tokens=1)`` (the prefill) and ``generate(max_new_tokens=N)`` with greedy
decoding and ``min_new_tokens=N``, and reports decode tokens/s and ms per token from the
difference (wall clock, synchronized), the host share of a decode step (for ``oscar`` and
``dynamic``: the time to issue one forward, unsynchronized, over its synchronized wall time;
near 1 = host-bound), and the peak GPU memory. Writes DIR/generate.json, DIR/generate.md and DIR/generate.png (decode tokens/s per
case and cache kind; needs matplotlib: ``--replot DIR/generate.json`` draws it later on another
machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_model(tiny=False):
    """Llama-3.1-8B shapes with random bf16 weights on the GPU, or (``tiny``: a smoke test of
    this script on any machine) a 2-layer model with the same head layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                          max_position_embeddings=4096, head_dim=128)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                          max_position_embeddings=131072, rope_theta=500000.0)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(default)
    return model.eval()


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _kv_bytes(cache) -> int:
    """Bytes of the K/V history a cache holds (packed + residual for OScaR layers)."""
    total = 0
    for layer in cache.layers:
        inner = getattr(layer, "cache", None)
        if inner is not None:
            total += inner.nbytes
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.numel() * layer.keys.element_size() * 2
    return total


class _Out:
    """The fields of generate()'s output that run_case reads."""

    def __init__(self, sequences, past_key_values):
        self.sequences, self.past_key_values = sequences, past_key_values


def run_case(model, batch, prompt, new, kind, steps=16):
    import oscar
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEVICE)
    mask = torch.ones_like(ids)

    extra = {}
    if kind == "static":
        extra = dict(cache_implementation="static")
    elif kind.startswith(("quanto", "hqq")):
        backend, bits = kind[:-1], int(kind[-1])
        extra = dict(cache_implementation="quantized",
                     cache_config={"backend": backend, "nbits": bits})

    def cache():
        if kind == "oscar":
            from oscar.integrations.transformers import OScaRCache

            return OScaRCache(model.config, oscar.OScaRConfig(), max_cache_len=prompt + new)
        if kind == "dynamic":
            return DynamicCache(config=model.config)
        return None  # transformers builds it from cache_implementation

    model.set_attn_implementation("oscar" if kind == "oscar" else "sdpa")
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, **extra)

    def gen(n):
        _sync()
        t0 = time.perf_counter()
        if kind == "oscar_graph":  # the whole decode step replayed from one CUDA graph
            from oscar.integrations.transformers import graphed_generate

            toks, c = graphed_generate(model, ids, n, attention_mask=mask,
                                       oscar_config=oscar.OScaRConfig())
            _sync()
            return time.perf_counter() - t0, _Out(torch.cat([ids, toks], dim=1), c)
        with torch.no_grad():
            c = cache()
            out = model.generate(**kw, max_new_tokens=n, min_new_tokens=n,
                                 return_dict_in_generate=True,
                                 **({} if c is None else {"past_key_values": c}))
        _sync()
        return time.perf_counter() - t0, out

    gen(2)  # warm-up (kernels, allocator, compile for "static")
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1, _ = gen(1)
    tn, out = gen(new)
    peak = torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else float("nan")
    ms_per_token = (tn - t1) / (new - 1) * 1e3
    row = dict(kind=kind, batch=batch, prompt=prompt, new=new, prefill_s=t1,
               ms_per_token=ms_per_token, tokens_per_s=batch * 1e3 / ms_per_token,
               peak_gb=peak, tokens=out.sequences[:, prompt:prompt + 8].tolist())
    pkv = out.past_key_values
    if pkv is not None and hasattr(pkv, "layers"):
        row["kv_gb_per_seq"] = _kv_bytes(pkv) / batch / 1e9
    if kind in ("oscar", "dynamic"):
        row.update(_host_share(model, ids, mask, cache, steps))
    return row


def _host_share(model, ids, mask, cache, steps):
    """One forward per decode step after a prefill, as generate() runs it: the host time to
    issue the step (until the forward returns, no synchronization) against the step's wall time
    (synchronized). ``host_ms / step_ms`` near 1: the step is host-bound (the GPU waits for
    Python); well below 1: the GPU is the limit."""
    with torch.no_grad():
        c = cache()
        out = model(input_ids=ids, attention_mask=mask, past_key_values=c, use_cache=True,
                    logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync()
        issue, wall = [], []
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=c, use_cache=True,
                        logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            _sync()
            t2 = time.perf_counter()
            issue.append(t1 - t0)
            wall.append(t2 - t0)
    host, step = statistics.median(issue) * 1e3, statistics.median(wall) * 1e3
    return dict(host_ms=host, step_ms=step, host_share=host / step)


def fits(rows, memory_gb, weights_gb, seq=131072):
    """Largest batch of ``seq``-token sequences whose KV history fits beside the weights, from
    the measured KV bytes per sequence (scaled linearly in tokens), per cache kind."""
    out = {}
    if memory_gb != memory_gb:  # no GPU: nothing to fit
        return out
    for r in rows:
        if "kv_gb_per_seq" in r and r["kind"] not in out:
            per_seq = r["kv_gb_per_seq"] * seq / (r["prompt"] + r["new"])
            out[r["kind"]] = dict(kv_gb_per_seq_128k=per_seq,
                                  max_batch_128k=int((memory_gb - weights_gb) // per_seq))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="generate_out")
    p.add_argument("--cases", default="1x8192,8x8192,1x32768")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--kinds", default="dynamic,oscar")
    p.add_argument("--tiny", action="store_true",
                   help="a 2-layer model (smoke test of this script; runs on CPU too)")
    p.add_argument("--replot", metavar="JSON",
                   help="only draw generate.png from a generate.json (e.g. one from a GPU "
                        "machine without matplotlib) into --out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot) as fh:
            res = json.load(fh)
        plot(res["rows"], os.path.join(args.out, "generate.png"),
             f"generate() on {res['gpu']}, {res['date']}")
        return
    import oscar.integrations.transformers  # noqa: F401  registers "oscar"

    model = build_model(args.tiny)
    weights_gb = sum(t.numel() * t.element_size() for t in model.parameters()) / 1e9
    rows = []
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    memory_gb = (torch.cuda.get_device_properties(0).total_memory / 1e9 if DEVICE == "cuda"
                 else float("nan"))
    res = dict(gpu=gpu, date=datetime.date.today().isoformat(), weights_gb=weights_gb,
               memory_gb=memory_gb, rows=rows)
    for case in args.cases.split(","):
        batch, prompt = (int(x) for x in case.split("x"))
        for kind in args.kinds.split(","):
            try:
                rows.append(run_case(model, batch, prompt, args.new, kind))
            except torch.OutOfMemoryError as exc:
                rows.append(dict(kind=kind, batch=batch, prompt=prompt, error=f"OOM: {exc}"[:200]))
            except (ImportError, ValueError, RuntimeError, KeyError) as exc:  # quanto/hqq missing
                rows.append(dict(kind=kind, batch=batch, prompt=prompt,
                                 error=f"{type(exc).__name__}: {exc}"[:200]))
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
            res["fits_128k"] = fits(rows, memory_gb, weights_gb)
            with open(os.path.join(args.out, "generate.json"), "w") as f:
                json.dump(res, f, indent=1)
    lines = [f"# generate() end to end ({gpu}, {res['date']}), "
             f"{'tiny model' if args.tiny else 'Llama-3.1-8B shapes'}, random bf16 weights "
             f"({weights_gb:.1f} GB), greedy, {args.new} new tokens", "",
             "| cache | B | prompt | prefill s | ms/token | tokens/s | host ms/step | host share "
             "| KV GB/seq | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(r, k, fmt):
        return format(r[k], fmt) if k in r else "-"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['batch']} | {r['prompt']} | {r['error'][:60]} |")
            continue
        lines.append(f"| {r['kind']} | {r['batch']} | {r['prompt']} | {r['prefill_s']:.2f} | "
                     f"{r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | {f(r, 'host_ms', '.2f')}"
                     f" | {f(r, 'host_share', '.2f')} | {f(r, 'kv_gb_per_seq', '.3f')} | "
                     f"{r['peak_gb']:.1f} |")
    if res["fits_128k"]:
        lines += ["", f"Sequences of 128K tokens that fit beside the weights in {memory_gb:.0f} GB "
                  "(KV bytes per sequence measured, scaled to 128K): " + ", ".join(
                      f"{k} {v['max_batch_128k']} ({v['kv_gb_per_seq_128k']:.2f} GB each)"
                      for k, v in res["fits_128k"].items())]
    with open(os.path.join(args.out, "generate.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, os.path.join(args.out, "generate.png"), f"generate() on {gpu}, {res['date']}")


def plot(rows, path, title):
    """Bar chart of decode tokens/s per case (batch x prompt), one bar per cache kind; nothing
    without matplotlib (``pip install matplotlib``) or without a measured row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("generate.png: matplotlib is not installed", flush=True)
        return
    ok = [r for r in rows if "tokens_per_s" in r]
    if not ok:
        return
    cases = list(dict.fromkeys((r["batch"], r["prompt"]) for r in ok))
    kinds = list(dict.fromkeys(r["kind"] for r in ok))
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cases), 3.6))
    for i, kind in enumerate(kinds):
        vals = [next((r["tokens_per_s"] for r in ok if r["kind"] == kind
                      and (r["batch"], r["prompt"]) == c), 0.0) for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=kind)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"B={b}\n{p // 1024}K" if p >= 1024 else f"B={b}\n{p}"
                        for b, p in cases])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
