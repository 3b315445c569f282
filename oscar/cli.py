"""The ``oscar`` command line (also ``python -m oscar``).

    oscar report                       # built-in synthetic data with Token Norm Imbalance
    oscar report --kv kv.npz --plots out/ --json out/report.json
    oscar report --model DIR_OR_NAME [--text FILE] [--tokens N] [--device cpu|cuda]  # doctor
    oscar warmup --model DIR [--batch-sizes 1,8] [--q-lens 1,2,3]   # CUDA kernels ahead of time
    oscar kernel-cache [--clear]                                     # the compiled kernels
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

from . import __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oscar", description="OScaR 2-bit KV-cache quantization: tools.")
    parser.add_argument("--version", action="version", version=f"oscar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rep = sub.add_parser(
        "report", help="quality and memory of KIVI / OScaR configurations on K/V data",
        description="Quantize one layer's K/V with the ablation configurations (bf16, KIVI, "
                    "rotation-only, scaling-only, OScaR; INT2 and INT4) and print bits per "
                    "element, compression, key error, attention-output error (SQNR dB) and "
                    "sink-token errors. Runs on the NumPy reference backend.")
    src = rep.add_argument_group("data (built-in synthetic unless --kv is given)")
    src.add_argument("--kv", metavar="FILE",
                     help=".npz or .safetensors with arrays k, v [batch, num_kv_heads, seq_len, "
                          "head_dim] (3-D: batch 1), optional q and sink_positions")
    src.add_argument("--sinks", metavar="I,J,..",
                     help="with --kv: sink token indices (default: the file's, else 0)")
    src.add_argument("--num-q-heads", type=int, default=None, metavar="N",
                     help="query heads (synthetic default 32; with --kv and no q in the file: "
                          "default num_kv_heads)")
    # Synthetic-only options default to None, so that giving one with --kv is an error (the
    # file fixes the shapes) instead of being silently ignored; SYNTHETIC_DEFAULTS fills them.
    src.add_argument("--seq-len", type=int, metavar="N", help="synthetic tokens (default 1024)")
    src.add_argument("--batch", type=int, metavar="N", help="synthetic batch (default 1)")
    src.add_argument("--num-kv-heads", type=int, metavar="N", help="synthetic KV heads (default 8)")
    src.add_argument("--head-dim", type=int, metavar="N", help="synthetic head_dim (default 128)")
    src.add_argument("--num-sinks", type=int, metavar="N",
                     help="synthetic sink tokens (default 4, at most --seq-len)")
    src.add_argument("--seed", type=int, metavar="N", help="synthetic seed (default 0)")
    out = rep.add_argument_group("output")
    out.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                     help="K/V are cast to this dtype before quantizing; the residual window is "
                          "stored in it (default float16: a model's 16-bit cache, the bytes of "
                          "bf16; float32 keeps the inputs exact)")
    out.add_argument("--plots", metavar="DIR", help="write PNG plots here (needs matplotlib)")
    out.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    from . import _doctor_cli  # the --model group (the quantization doctor, oscar/doctor.py)

    _doctor_cli.add_arguments(rep)
    from . import _runtime_cli  # oscar warmup, oscar kernel-cache

    _runtime_cli.add_parsers(sub)
    return parser


#: The synthetic data's options (argparse dest -> default): make_tni_kv's argument names.
SYNTHETIC_DEFAULTS = dict(seq_len=1024, batch=1, num_kv_heads=8, head_dim=128, num_sinks=4,
                          seed=0)


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _load(args):
    from .synthetic import load_kv, make_tni_kv

    given = [d for d in SYNTHETIC_DEFAULTS if getattr(args, d) is not None]
    if args.kv:
        if given:
            raise ValueError(f"{_option(given[0])}: only for the synthetic data; with --kv the "
                             f"shapes come from {args.kv}")
        sinks = None if args.sinks is None else _int_list("--sinks", args.sinks)
        return load_kv(args.kv, num_q_heads=args.num_q_heads, sink_positions=sinks)
    if args.sinks is not None:
        raise ValueError("--sinks: only with --kv (the synthetic data places its own sinks; "
                         "see --num-sinks)")
    kw = {d: getattr(args, d) if getattr(args, d) is not None else default
          for d, default in SYNTHETIC_DEFAULTS.items()}
    kw["num_q_heads"] = 32 if args.num_q_heads is None else args.num_q_heads
    try:
        return make_tni_kv(**kw)
    except ValueError as exc:  # name the command-line option, not the Python argument
        names = "|".join((*SYNTHETIC_DEFAULTS, "num_q_heads"))
        msg = re.sub(rf"\b({names})\b", lambda m: _option(m.group(1)), str(exc))
        raise ValueError(msg) from None


def _check_outputs(args) -> None:
    """Fail before the computation (minutes at 32K tokens) if an output cannot be written."""
    if args.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plots needs matplotlib: pip install 'oscar-kv[report]'") from None
        try:
            os.makedirs(args.plots, exist_ok=True)
            tempfile.TemporaryFile(dir=args.plots).close()
        except OSError as exc:
            raise OSError(f"--plots: cannot write into {args.plots!r}: {exc}") from None
    if args.json:
        existed = os.path.exists(args.json)
        try:
            open(args.json, "a").close()
        except OSError as exc:
            raise OSError(f"--json: cannot write {args.json!r}: {exc}") from None
        if not existed:
            os.remove(args.json)


def _progress(i: int, n: int, name: str, seconds: float) -> None:
    print(f"oscar report: [{i}/{n}] {name} ({seconds:.1f} s)", file=sys.stderr, flush=True)


def _int_list(name, text):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated token indices, got {text!r}") from None


def _report(args) -> int:
    from . import _doctor_cli, report

    if _doctor_cli.wants_model(args):
        return _doctor_cli.run_cli(args)

    t0 = time.perf_counter()
    _check_outputs(args)
    data = _load(args)
    print(f"oscar report: k {list(data.k.shape)}, {len(report.CONFIGS)} configurations on the "
          "NumPy reference (about a minute at 32K tokens)", file=sys.stderr, flush=True)
    rows, extras = report.evaluate(data, dtype=args.dtype, progress=_progress)
    for name, why in extras.get("skipped", ()):
        print(f"oscar report: skipped {name}: {why}", file=sys.stderr)
    print(data.description)
    print(f"cache dtype {args.dtype}; full-precision attention mass on the sinks: "
          f"{extras['sink_mass_fp']:.3f}; errors are relative Frobenius norms")
    if extras.get("sink_note"):
        print(extras["sink_note"])
    print(report.format_table(rows))
    if args.plots:
        for path in report.write_plots(args.plots, data, extras):
            print(f"wrote {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(rows, data, extras, args.dtype), f, indent=2)
        print(f"wrote {args.json}")
    print(f"({time.perf_counter() - t0:.2f} s)")
    return 0


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command in ("warmup", "kernel-cache"):
            from . import _runtime_cli

            return _runtime_cli.run(args)
        return _report(args)
    except (ValueError, TypeError, ImportError, OSError) as exc:
        print(f"oscar {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
