"""``oscar warmup`` and ``oscar kernel-cache``: prepare the CUDA kernels of a model ahead of time
(a container build step, a server start) and inspect or empty the per-machine kernel cache.

    oscar warmup --model DIR_OR_CONFIG_JSON [--batch-sizes 1,8] [--q-lens 1,2,3,4,5]
    oscar warmup --num-kv-heads 8 --head-dim 128 --num-q-heads 32 [--dtype bfloat16]
    oscar warmup ... --layer-configs plan.json   # the per-layer plan of `oscar report --model`
    oscar warmup ... --dry-run          # print what would be prepared, prepare nothing
    oscar kernel-cache [--clear]        # directory, entries, bytes; --clear deletes them

``--model`` reads only the model's ``config.json`` (a local directory or the file itself; no
download, no transformers import): query and KV heads, head_dim and dtype, from the text config
of a multimodal model.
"""

from __future__ import annotations

import json
import os

DTYPES = ("bfloat16", "float16", "float32")


def add_parsers(sub) -> None:
    w = sub.add_parser(
        "warmup", help="compile or load the CUDA kernels of a model's shapes ahead of time",
        description="Compile (first time on this machine) or load every CUDA kernel that "
                    "caches of these shapes use: quantize/flush for each batch size, decode for "
                    "each query length. Compiled kernels go to the per-machine kernel cache "
                    "(see `oscar kernel-cache`), so later processes load them in milliseconds.")
    shape = w.add_argument_group("shapes (from --model, or given one by one)")
    shape.add_argument("--model", metavar="PATH",
                       help="a model directory with config.json, or the config.json itself")
    shape.add_argument("--num-kv-heads", type=int, metavar="N")
    shape.add_argument("--head-dim", type=int, metavar="N")
    shape.add_argument("--num-q-heads", type=int, metavar="N",
                       help="query heads (without it, and without --model, only the quantize "
                            "kernels are prepared)")
    shape.add_argument("--dtype", choices=DTYPES,
                       help="K/V and query dtype (default: the model's torch_dtype, else "
                            "bfloat16)")
    w.add_argument("--batch-sizes", default="1", metavar="B,..",
                   help="batch sizes the caches will have (default 1)")
    w.add_argument("--q-lens", default="1", metavar="L,..",
                   help="query tokens per decode step (default 1; speculative/assisted "
                        "decoding with N draft tokens: 1,..,N+1)")
    cfg = w.add_argument_group("OScaR configuration (default: the paper's INT2)")
    cfg.add_argument("--layer-configs", metavar="JSON",
                     help="the per-layer configurations written by `oscar report --model "
                          "--json` (every distinct one is prepared; unquantized layers need "
                          "nothing)")
    cfg.add_argument("--key-bits", type=int, choices=(2, 4, 8))
    cfg.add_argument("--value-bits", type=int, choices=(2, 4, 8))
    cfg.add_argument("--residual-length", type=int, metavar="R")
    w.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    w.add_argument("--dry-run", action="store_true",
                   help="print the shapes and configuration, prepare nothing")
    k = sub.add_parser(
        "kernel-cache", help="where the compiled CUDA kernels are stored; --clear empties it",
        description="The per-machine kernel cache: $OSCAR_CACHE_DIR, else "
                    "$XDG_CACHE_HOME/oscar/kernels, else ~/.cache/oscar/kernels "
                    "(OSCAR_KERNEL_CACHE=0 turns it off).")
    k.add_argument("--clear", action="store_true", help="delete every compiled kernel in it")


def _positive_ints(name: str, text: str) -> tuple:
    try:
        vals = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated positive ints, got {text!r}") \
            from None
    if not vals or any(v <= 0 for v in vals):
        raise ValueError(f"--{name}: expected comma-separated positive ints, got {text!r}")
    return vals


def model_shapes(path: str) -> dict:
    """``{"num_kv_heads", "head_dim", "num_q_heads", "dtype"}`` from a model's config.json (a
    directory holding it, or the file); the text config of a multimodal model."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"--model: expected a model directory with config.json or a "
                         f"config.json file, got {path!r}")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model: {file} is not JSON ({exc})") from None
    text = cfg.get("text_config") or cfg
    heads = text.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"--model: {file} has no positive num_attention_heads")
    kv = text.get("num_key_value_heads") or heads
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise ValueError(f"--model: {file}: expected num_key_value_heads a positive divisor of "
                         f"num_attention_heads ({heads}), got {kv!r}")
    head_dim = text.get("head_dim")
    if not head_dim:
        hidden = text.get("hidden_size")
        if not isinstance(hidden, int) or hidden % heads:
            raise ValueError(f"--model: {file} has neither head_dim nor a hidden_size "
                             "divisible by num_attention_heads")
        head_dim = hidden // heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"--model: {file}: expected a positive int head_dim, got {head_dim!r}")
    dtype = text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype")
    return {"num_kv_heads": int(kv), "head_dim": int(head_dim), "num_q_heads": int(heads),
            "dtype": dtype if dtype in DTYPES else "bfloat16"}


def run_warmup(args) -> int:
    from .config import OScaRConfig

    if args.model:
        shapes = model_shapes(args.model)
        for name in ("num_kv_heads", "head_dim", "num_q_heads"):  # explicit values win
            if getattr(args, name) is not None:
                shapes[name] = getattr(args, name)
    else:
        if args.num_kv_heads is None or args.head_dim is None:
            raise ValueError("warmup: expected --model, or --num-kv-heads and --head-dim")
        shapes = {"num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
                  "num_q_heads": args.num_q_heads, "dtype": "bfloat16"}
    if args.dtype:
        shapes["dtype"] = args.dtype
    changes = {k: v for k, v in (("key_bits", args.key_bits), ("value_bits", args.value_bits),
                                 ("residual_length", args.residual_length)) if v is not None}
    if args.layer_configs:
        if changes:
            raise ValueError("--layer-configs fixes every layer's configuration: give "
                             "--key-bits/--value-bits/--residual-length only without it")
        from .layer_configs import load_layer_configs

        configs = list(dict.fromkeys(c for c in load_layer_configs(args.layer_configs)
                                     if c is not None))
    else:
        configs = [OScaRConfig(**changes)]
    for config in configs:
        config.check_head_dim(shapes["head_dim"], "head_dim")
    batch_sizes = _positive_ints("batch-sizes", args.batch_sizes)
    q_lens = _positive_ints("q-lens", args.q_lens)
    print(f"oscar warmup: {shapes['num_kv_heads']} KV heads x {shapes['head_dim']}, "
          f"{shapes['num_q_heads'] or 'no'} query heads, {shapes['dtype']}; batch sizes "
          f"{list(batch_sizes)}; q_lens {list(q_lens)}; {len(configs)} configuration"
          f"{'s' if len(configs) != 1 else ''}", flush=True)
    for config in configs:
        print(f"  {config}", flush=True)
    if args.dry_run or not configs:
        return 0
    from .runtime import kernel_cache_info, warmup

    total = {"kernels": 0, "compiled": 0, "loaded": 0, "seconds": 0.0}
    for config in configs:
        res = warmup(config, num_kv_heads=shapes["num_kv_heads"], head_dim=shapes["head_dim"],
                     num_q_heads=shapes["num_q_heads"], dtype=shapes["dtype"],
                     batch_sizes=batch_sizes, q_lens=q_lens, device=args.device)
        for k in total:
            total[k] += res[k]
    info = kernel_cache_info()
    print(f"oscar warmup: {total['kernels']} kernels ready ({total['compiled']} compiled, "
          f"{total['loaded']} loaded) in {total['seconds']:.1f} s; kernel cache "
          f"{info['directory']} ({info['entries']} entries)")
    return 0


def run_kernel_cache(args) -> int:
    from .runtime import clear_kernel_cache, kernel_cache_info

    if args.clear:
        n = clear_kernel_cache()
        print(f"oscar kernel-cache: removed {n} compiled kernels")
    info = kernel_cache_info()
    state = "on" if info["enabled"] else f"off ({info['disabled_reason'] or 'disabled'})"
    print(f"directory {info['directory']}\nstate {state}\nentries {info['entries']}\n"
          f"bytes {info['bytes']}")
    return 0


def run(args) -> int:
    if args.command == "warmup":
        return run_warmup(args)
    return run_kernel_cache(args)


__all__ = ["add_parsers", "model_shapes", "run"]
