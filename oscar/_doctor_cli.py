"""The ``--model`` options of ``oscar report`` (the quantization doctor): argument group, early
output checks, and the run that prints and writes the report. The measuring is in
:mod:`oscar.doctor`; this module only connects it to the command line (oscar/cli.py).
"""

from __future__ import annotations

import json
import os
import sys
import time

from . import doctor
from .doctor import DEFAULT_TOKENS, format_report, min_tokens, to_json


def add_arguments(parser) -> None:
    """Add the ``--model`` group to the ``oscar report`` parser."""
    g = parser.add_argument_group(
        "model (the quantization doctor: capture a causal LM's Q/K/V and measure every layer)")
    g.add_argument("--model", metavar="DIR_OR_NAME",
                   help="a Hugging Face causal LM: a local directory (config.json + safetensors) "
                        "or a hub name where the hub is reachable")
    g.add_argument("--text", metavar="FILE", help="with --model: UTF-8 text to run the model on "
                   "(default: built-in public-domain prose, repeated)")
    g.add_argument("--tokens", type=int, default=None, metavar="N",
                   help=f"with --model: tokens to run (default {DEFAULT_TOKENS}; at least "
                        f"{min_tokens()})")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="with --model: where the model runs (default cpu); quantization is "
                        "measured on the NumPy reference")


def wants_model(args) -> bool:
    """True when any option of the ``--model`` group was given."""
    return any(getattr(args, a, None) is not None for a in ("model", "text", "tokens", "device"))


def check_outputs(json_path=None, plots_dir=None) -> None:
    """Fail early, before minutes of computation, on output paths that cannot be written and on
    plots without matplotlib."""
    if json_path is not None:
        if os.path.isdir(json_path):
            raise ValueError(f"--json {json_path}: is a directory; expected a file path")
        parent = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(parent):
            raise ValueError(f"--json {json_path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK) or (os.path.exists(json_path)
                                              and not os.access(json_path, os.W_OK)):
            raise ValueError(f"--json {json_path}: not writable")
    if plots_dir is not None:
        from ._doctor_plots import check_matplotlib

        check_matplotlib()
        if os.path.exists(plots_dir) and not os.path.isdir(plots_dir):
            raise ValueError(f"--plots {plots_dir}: exists and is not a directory")
        try:
            os.makedirs(plots_dir, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--plots {plots_dir}: cannot create the directory ({exc})") from None
        if not os.access(plots_dir, os.W_OK):
            raise ValueError(f"--plots {plots_dir}: not writable")


def run_cli(args) -> int:
    """``oscar report --model ...``: diagnose, print, write --json and --plots."""
    if args.model is None:
        raise ValueError("--text, --tokens and --device need --model")
    if getattr(args, "kv", None) or getattr(args, "sinks", None):
        raise ValueError("--model: not with --kv or --sinks (the model's own K/V are measured)")
    check_outputs(args.json, args.plots)
    text = None
    if args.text is not None:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--text {args.text}: cannot read it ({exc})") from None
    t0 = time.perf_counter()
    rep = doctor.diagnose(args.model, text=text, text_name=args.text,
                   tokens=DEFAULT_TOKENS if args.tokens is None else args.tokens,
                   device=args.device or "cpu", progress=True)
    print(format_report(rep))
    if args.plots:
        from ._doctor_plots import write_plots

        for path in write_plots(args.plots, rep):
            print(f"wrote {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rep), f, indent=2, allow_nan=False)
            f.write("\n")
        print(f"wrote {args.json} (per-layer plan, format oscar-layer-configs, and the report)")
    s = rep.seconds
    print(f"({time.perf_counter() - t0:.1f} s: load {s['load']:.1f}, capture "
          f"{s['capture']:.1f}, quantize and measure {s['quantize']:.1f})", file=sys.stdout)
    return 0
