"""End-to-end generate() on a GPU: OScaRCache vs transformers' own caches.

    python benchmarks/generate.py --out DIR [--cases 1x8192,8x8192,1x32768] [--new 64]
                                  [--kinds dynamic,oscar,static,quanto2,quanto4,hqq2,hqq4]

Kinds: ``oscar`` (OScaRCache, eager), ``dynamic`` (DynamicCache + SDPA bf16, eager), ``static``
(``cache_implementation="static"``: a preallocated bf16 cache whose decode step transformers
compiles with torch.compile), ``quanto2/4`` and ``hqq2/4`` (``cache_implementation="quantized"``,
transformers' QuantizedCache with the optimum-quanto or HQQ backend at 2/4 bits; their packages
must be installed, on the device machine as carried wheels: a missing one is reported, not
fatal).

A Llama-3.1-8B configuration with random bf16 weights (speed does not depend on the weights):
32 layers, 32 query heads, 8 KV heads, head_dim 128. For each (batch, prompt length) it runs
``generate(max_new_tokens=1)`` (the prefill) and ``generate(max_new_tokens=N)`` with greedy
decoding and ``min_new_tokens=N``, and reports decode tokens/s and ms per token from the
difference (wall clock, synchronized), the host share of a decode step (a step's wall time
minus the GPU time of the same step, from CUDA events around one forward), and the peak GPU
memory. Writes DIR/generate.json and DIR/generate.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=131072, rope_theta=500000.0)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(default)
    return model.eval()


def run_case(model, batch, prompt, new, kind):
    import oscar
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
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
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            c = cache()
            out = model.generate(**kw, max_new_tokens=n, min_new_tokens=n,
                                 **({} if c is None else {"past_key_values": c}))
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    gen(2)  # warm-up (kernels, allocator)
    torch.cuda.reset_peak_memory_stats()
    t1, _ = gen(1)
    tn, out = gen(new)
    peak = torch.cuda.max_memory_allocated() / 1e9
    ms_per_token = (tn - t1) / (new - 1) * 1e3
    return dict(kind=kind, batch=batch, prompt=prompt, new=new, prefill_s=t1,
                ms_per_token=ms_per_token, tokens_per_s=batch * 1e3 / ms_per_token,
                peak_gb=peak, tokens=out[:, prompt:prompt + 8].tolist())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="generate_out")
    p.add_argument("--cases", default="1x8192,8x8192,1x32768")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--kinds", default="dynamic,oscar")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import oscar.integrations.transformers  # noqa: F401  registers "oscar"

    model = build_model()
    rows = []
    res = dict(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), rows=rows)
    for case in args.cases.split(","):
        batch, prompt = (int(x) for x in case.split("x"))
        for kind in args.kinds.split(","):
            try:
                rows.append(run_case(model, batch, prompt, args.new, kind))
            except torch.OutOfMemoryError as exc:
                rows.append(dict(kind=kind, batch=batch, prompt=prompt, error=f"OOM: {exc}"[:200]))
            except (ImportError, ValueError, RuntimeError) as exc:  # e.g. quanto/hqq missing
                rows.append(dict(kind=kind, batch=batch, prompt=prompt,
                                 error=f"{type(exc).__name__}: {exc}"[:200]))
            torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
            with open(os.path.join(args.out, "generate.json"), "w") as f:
                json.dump(res, f, indent=1)
    lines = [f"# generate() end to end ({res['gpu']}, {res['date']}), Llama-3.1-8B shapes, "
             "random bf16 weights, eager", "",
             "| cache | B | prompt | prefill s | ms/token | tokens/s | peak GB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['batch']} | {r['prompt']} | {r['error'][:40]} |")
            continue
        lines.append(f"| {r['kind']} | {r['batch']} | {r['prompt']} | {r['prefill_s']:.2f} | "
                     f"{r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | {r['peak_gb']:.1f} |")
    with open(os.path.join(args.out, "generate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
