"""Plots of ``oscar report --model --plots DIR`` (matplotlib, Agg backend):

* ``layer_errors.png``: attention-output error per layer, one bar per configuration, a panel per
  bit width;
* ``key_norms_worst_layer.png``: the key-norm profile of the layer with the largest error under
  the INT2 winner, its sinks and lowest-norm tokens marked, the residual tail shaded;
* ``pareto.png``: mean attention-output error vs bits per element for every configuration and the
  recommended per-layer plan, the Pareto front (no other point is both smaller and better) drawn.
"""

from __future__ import annotations

import os

import numpy as np

from .report import _save  # one figure-saving helper for both reports


def check_matplotlib():
    """Import matplotlib with the Agg backend, or raise ImportError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plots needs matplotlib: pip install 'oscar-kv[report]'") from exc
    return plt


def write_plots(out_dir, rep) -> list:
    """Write the three PNGs of a :class:`oscar.doctor.DoctorReport` into ``out_dir``; returns
    their paths."""
    plt = check_matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    return [_layer_errors(plt, out_dir, rep), _norm_profile(plt, out_dir, rep),
            _pareto(plt, out_dir, rep)]


def _layer_errors(plt, out_dir, rep):
    bits = sorted({c.key_bits for _, c in rep.configs})
    fig, axes = plt.subplots(len(bits), 1, figsize=(max(8, 0.5 * rep.num_layers + 3),
                                                     2.8 * len(bits)), squeeze=False)
    x = np.arange(rep.num_layers)
    for ax, b in zip(axes[:, 0], bits):
        names = [n for n, c in rep.configs if c.key_bits == b]
        width = 0.8 / len(names)
        for j, n in enumerate(names):
            err = [m[n].attn_err for m in rep.metrics]
            ax.bar(x + (j - (len(names) - 1) / 2) * width, err, width, label=n)
        ax.set(ylabel="attn err", title=f"INT{b}: attention-output error per layer")
        ax.set_xticks(x)
        ax.legend(fontsize=7, ncol=len(names), loc="upper right")
    axes[-1, 0].set_xlabel("layer")
    return _save(fig, out_dir, "layer_errors.png")


def _norm_profile(plt, out_dir, rep):
    r = rep.recommendation
    best = r.best[min(r.best)]
    i = rep.worst_layer(best)
    n = rep.norms[i]
    s = rep.stats[i]
    t = np.arange(n.size)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.semilogy(t, n, lw=0.7, color="tab:blue", label="key norm (all KV heads)")
    low = np.asarray(s.low_norm_tokens)
    ax.scatter(low, n[low], color="tab:purple", marker="v", zorder=3, label="lowest-norm tokens")
    if s.sinks:
        sk = np.asarray([x["token"] for x in s.sinks])
        ax.scatter(sk, n[sk], color="tab:red", zorder=4,
                   label="sinks (attention share >= 5%)")
    r_len = rep.configs[0][1].residual_length
    tq = n.size // r_len * r_len
    if tq < n.size:
        ax.axvspan(tq - 0.5, n.size - 0.5, color="0.9", label="residual (never quantized)")
    ax.set(xlabel="token", ylabel="||k_t||",
           title=f"layer {i} (worst under {best}: attn err "
                 f"{rep.metrics[i][best].attn_err:.3f}): key norm per token")
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, out_dir, "key_norms_worst_layer.png")


#: One marker per method (INT2 and INT4 share it; bits tell them apart on the x axis).
_MARKERS = {"KIVI": ("o", "tab:orange"), "rotation-only": ("s", "tab:blue"),
            "scaling-only": ("^", "tab:purple"), "OScaR": ("D", "tab:green"),
            "OScaR-head": ("v", "tab:olive")}


def _pareto(plt, out_dir, rep):
    r = rep.recommendation
    pts = [(rep.bits(n), rep.mean(n, "attn_err"), n) for n, _ in rep.configs]
    plan = (r.bits_per_element, r.mean_attn_err, "recommended per-layer plan")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for b, e, n in pts:
        method = n.rsplit(" ", 1)[0]
        marker, color = _MARKERS.get(method, ("x", "0.3"))
        ax.scatter(b, e, marker=marker, color=color, zorder=3, alpha=0.8,
                   label=None if method in seen else method)
        seen.add(method)
    ax.scatter(plan[0], plan[1], marker="*", s=180, color="tab:red", zorder=4, label=plan[2])
    front = _pareto_front(pts + [plan])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="0.4", lw=1,
            label="Pareto front")
    ax.set(xlabel="bits per element (quantized part)", ylabel="mean attention-output error",
           title="error vs memory (means over layers)", yscale="log")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "pareto.png")


def _pareto_front(points):
    """Points that no other point beats on both bits and error, sorted by bits."""
    front, best = [], np.inf
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front
