"""``oscar report``: quality and memory of the ablation configurations on one set of K/V/Q.

Every row quantizes the same keys and values with :func:`oscar.quantize_kv`, runs
:func:`oscar.decode_attention`, and compares with float64 attention over the unquantized inputs
(:func:`oscar.reference.attention_dense`). The metrics (all relative errors are Frobenius norms):

========================  ====================================================================
bits/el, vs bf16           ``cache.bits_per_element`` and ``cache.compression`` of the whole
                           cache, residual window included (stored in ``dtype``)
key err                    ``||k_hat - k|| / ||k||`` over the quantized tokens (all heads)
sink key err               the same over the sink tokens that lie in the quantized part
attn err, SQNR             ``||out - out_fp|| / ||out_fp||`` and ``-20 log10`` of it, in dB
sink attn err              mean over (batch, query head, query) of ``|P_hat - P|``, P = softmax
                           mass on the sink tokens (P_hat from the dequantized cache)
========================  ====================================================================

The bf16 row rounds K and V to bfloat16 (round to nearest even) and nothing else: the floor that
a 16-bit cache sets.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from . import api
from .config import OScaRConfig
from .reference.attention import attention_dense

_KIVI = dict(rotate_keys=False, scale_tokens=False, rotate_values=False)
#: The rows of the report, in order: (name, configuration or None for the bf16 baseline).
CONFIGS = (
    ("bf16 baseline", None),
    ("KIVI INT2", OScaRConfig(**_KIVI)),
    ("rotation-only INT2", OScaRConfig(scale_tokens=False)),
    ("scaling-only INT2", OScaRConfig(rotate_keys=False)),
    ("OScaR INT2", OScaRConfig()),
    ("OScaR INT2 g128", OScaRConfig(key_group_size=128, value_group_size=128)),
    ("KIVI INT4", OScaRConfig(key_bits=4, value_bits=4, **_KIVI)),
    ("OScaR INT4", OScaRConfig(key_bits=4, value_bits=4)),
)
#: Storage dtypes of the cache's residual window that the report offers. float16 stands for the
#: 16-bit cache of a model (the same bytes as bfloat16); float32 keeps inputs exact.
DTYPES = {"float16": np.float16, "float32": np.float32}
#: Below this mean full-precision attention mass on the sinks, the sink attention error measures
#: nothing (it is at most about this mass): the column shows "-" and the report says why.
SINK_MASS_MIN = 1e-3


@dataclasses.dataclass
class Row:
    """One configuration's measurements (see the module docstring for the definitions)."""

    name: str
    key_bits: int
    value_bits: int
    bits_per_element: float
    compression: float
    key_err: float
    sink_key_err: float
    attn_err: float
    sqnr_db: float
    sink_attn_err: float
    seconds: float


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    lsb = (bits >> 16) & 1
    rounded = (bits + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)
    return rounded.astype(np.uint32).view(np.float32)


def rel_err(x_hat, x) -> float:
    """``||x_hat - x|| / ||x||`` in float64 (NaN when x is empty or zero)."""
    x = np.asarray(x, np.float64)
    den = np.linalg.norm(x)
    return float(np.linalg.norm(np.asarray(x_hat, np.float64) - x) / den) if den else math.nan


def sqnr_db(err: float) -> float:
    """Signal-to-quantization-noise ratio ``-20 log10(relative error)`` in dB."""
    return -20.0 * math.log10(err) if err > 0 else math.inf


def sink_mass(q, k, positions) -> np.ndarray:
    """Softmax mass on ``positions`` per (batch, query head, query), causal GQA, float64."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    b, hq, q_len, d = q.shape
    t = k.shape[2]
    s = np.einsum("bhld,bhtd->bhlt", q, np.repeat(k, hq // k.shape[1], axis=1)) / math.sqrt(d)
    visible = np.arange(t)[None, :] <= (t - q_len + np.arange(q_len))[:, None]
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return p[..., positions].sum(axis=-1) / p.sum(axis=-1)


def per_token_key_err(k_hat, k) -> np.ndarray:
    """``||k_hat_t - k_t|| / ||k_t||`` per (batch, token), the norm over all KV heads."""
    k = np.asarray(k, np.float64)
    num = np.sqrt(((np.asarray(k_hat, np.float64) - k) ** 2).sum(axis=(1, 3)))
    den = np.sqrt((k**2).sum(axis=(1, 3)))
    return num / np.where(den > 0, den, 1.0)


def evaluate(data, dtype: str = "float16", configs=CONFIGS, progress=None):
    """Measure every configuration on ``data`` (a :class:`oscar.synthetic.SyntheticKV`).

    ``progress(i, n, name, seconds)``, if given, is called after each configuration.
    Returns ``(rows, extras)``: a :class:`Row` per configuration, and a dict with the
    full-precision sink mass, the per-token key errors (for the plots) and ``sink_note`` (a
    sentence when the sinks receive (almost) no attention, else None).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    q, k, v = data.q, data.k, data.v
    out_fp = attention_dense(q, k, v)
    sinks = np.asarray(data.sink_positions, np.int64)
    p_fp = sink_mass(q, k, sinks)
    sink_note = None
    if sinks.size and float(p_fp.mean()) < SINK_MASS_MIN:
        sink_note = (f"the sinks receive almost no attention in full precision (mean mass "
                     f"{float(p_fp.mean()):.2g} < {SINK_MASS_MIN:g}): sink attn err not shown")
    with np.errstate(over="ignore"):
        k_in = k.astype(DTYPES[dtype])
        v_in = v.astype(DTYPES[dtype])
    if not (np.isfinite(k_in).all() and np.isfinite(v_in).all()):
        raise ValueError(f"dtype: the K/V values exceed the {dtype} range; use dtype='float32' "
                         "(--dtype float32)")
    rows, token_err, quantized_len = [], {}, k.shape[2]
    skipped = []  # (name, reason) of configurations that this head_dim does not support
    for name, cfg in configs:
        try:
            if cfg is not None:
                cfg.check_head_dim(k.shape[3])
        except ValueError as exc:
            skipped.append((name, str(exc)))
    configs = [(n, c) for n, c in configs if n not in dict(skipped)]
    for name, cfg in configs:
        t0 = time.perf_counter()
        if cfg is None:
            k_hat, v_hat = round_bf16(k), round_bf16(v)
            out = attention_dense(q, k_hat, v_hat)
            tq, bits, comp, kb, vb = k.shape[2], 16.0, 1.0, 16, 16
        else:
            cache = api.quantize_kv(k_in, v_in, cfg)
            out = api.decode_attention(q, cache)
            k_hat, v_hat = api.dequantize_kv(cache)
            tq, bits, comp = cache.quantized_len, cache.bits_per_element, cache.compression
            kb, vb = cfg.key_bits, cfg.value_bits
            quantized_len = min(quantized_len, tq)
        seconds = time.perf_counter() - t0
        qs = sinks[sinks < tq]
        err = rel_err(out, out_fp)
        rows.append(Row(
            name=name, key_bits=kb, value_bits=vb, bits_per_element=bits, compression=comp,
            key_err=rel_err(k_hat[:, :, :tq], k[:, :, :tq]),
            sink_key_err=rel_err(k_hat[:, :, qs], k[:, :, qs]) if qs.size else math.nan,
            attn_err=err, sqnr_db=sqnr_db(err),
            sink_attn_err=float(np.mean(np.abs(sink_mass(q, k_hat, sinks) - p_fp)))
            if sinks.size and sink_note is None else math.nan,
            seconds=seconds))
        if progress is not None:
            progress(len(rows), len(configs), name, seconds)
        token_err[name] = per_token_key_err(k_hat[:, :, :tq], k[:, :, :tq])
    extras = dict(sink_mass_fp=float(p_fp.mean()) if sinks.size else math.nan,
                  token_err=token_err, quantized_len=quantized_len, sink_note=sink_note,
                  skipped=skipped)
    return rows, extras


_COLUMNS = (  # header, width, format of one cell
    ("config", 19, lambda r: r.name),
    ("K/V bits", 8, lambda r: f"{r.key_bits}/{r.value_bits}"),
    ("bits/el", 7, lambda r: f"{r.bits_per_element:.2f}"),
    ("vs bf16", 7, lambda r: f"{r.compression:.2f}x"),
    ("key err", 7, lambda r: f"{r.key_err:.4f}"),
    ("sink key err", 12, lambda r: _num(r.sink_key_err, ".4f")),
    ("attn err", 8, lambda r: f"{r.attn_err:.4f}"),
    ("SQNR dB", 7, lambda r: _num(r.sqnr_db, ".1f")),
    ("sink attn err", 13, lambda r: _num(r.sink_attn_err, ".4f")),
)


def _num(x: float, fmt: str) -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def format_table(rows) -> str:
    """The rows as a fixed-width text table (also valid Markdown)."""
    head = "| " + " | ".join(h.ljust(w) for h, w, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("-" * (w + 2) for _, w, _ in _COLUMNS) + "|"
    body = ["| " + " | ".join(f(r).rjust(w) if i else f(r).ljust(w)
                              for i, (_, w, f) in enumerate(_COLUMNS)) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def to_json(rows, data, extras, dtype: str) -> dict:
    """A JSON-ready dict of the report (NaN and inf become null)."""
    clean = lambda x: None if isinstance(x, float) and not math.isfinite(x) else x
    return {
        "data": data.description,
        "shapes": {"k": list(data.k.shape), "q": list(data.q.shape)},
        "sink_positions": [int(s) for s in data.sink_positions],
        "sink_mass_fp": clean(extras["sink_mass_fp"]),
        "cache_dtype": dtype,
        "sink_note": extras.get("sink_note"),
        "rows": [{key: clean(val) for key, val in dataclasses.asdict(r).items()} for r in rows],
    }


def write_plots(out_dir, data, extras) -> list:
    """Write ``token_norms.png`` and ``token_key_error.png`` into ``out_dir``; returns paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plots needs matplotlib: pip install 'oscar-kv[report]'") from exc
    os.makedirs(out_dir, exist_ok=True)
    k = np.asarray(data.k, np.float64)
    t = k.shape[2]
    sinks = np.asarray(data.sink_positions)
    norms = np.sqrt((k[0] ** 2).sum(axis=(0, 2)))  # batch row 0, over all KV heads
    tq = extras["quantized_len"]
    paths = []

    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.semilogy(np.arange(t), norms, lw=0.7, color="tab:blue", label="key norm (all KV heads)")
    ax.scatter(sinks, norms[sinks], color="tab:red", zorder=3, label="sink tokens")
    if tq < t:
        ax.axvspan(tq - 0.5, t - 0.5, color="0.9", label=f"residual window (last {t - tq})")
    ax.set(xlabel="token", ylabel="||k_t||", title="Token Norm Imbalance: key norm per token")
    ax.legend(loc="lower right", fontsize=8)
    paths.append(_save(fig, out_dir, "token_norms.png"))

    fig, ax = plt.subplots(figsize=(9, 3.2))
    for name, color in (("KIVI INT2", "tab:orange"), ("OScaR INT2", "tab:green")):
        err = extras["token_err"].get(name)
        if err is not None and err.shape[1]:
            ax.semilogy(np.arange(err.shape[1]), err[0], lw=0.7, color=color, label=name)
            qs = sinks[sinks < err.shape[1]]
            ax.scatter(qs, err[0, qs], color=color, edgecolor="k", zorder=3)
    ax.set(xlabel="token (quantized part; circles: sinks)", ylabel="||k_hat_t - k_t|| / ||k_t||",
           title="Per-token relative key error")
    ax.legend(loc="upper right", fontsize=8)
    paths.append(_save(fig, out_dir, "token_key_error.png"))
    return paths


def _save(fig, out_dir, name) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
