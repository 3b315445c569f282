"""The quantization doctor, ``oscar report --model``: will OScaR work on this model?

It runs a Hugging Face causal LM once on a text (:mod:`oscar._capture`), takes every layer's
post-RoPE queries, keys and values, and measures with the library's own functions what each
configuration of the ablation does to that layer's decode attention:

======================  ======================================================================
key err                  ``||k_hat - k|| / ||k||`` over the quantized tokens of the whole text
                         (``dequantize_kv`` of the cache)
logit err                RMS over (query head, decode query, quantized token it sees) of
                         ``scale * q . (k_hat - k)``, in nats (softmax logits are absolute)
KL                       ``KL(P || P_hat)`` of each decode query's attention distribution, in
                         nats, mean over query heads and decode queries
attn err, SQNR dB        ``||out - out_fp|| / ||out_fp||`` over all decode queries and heads;
                         ``out`` from ``decode_attention``, ``out_fp`` float64 exact attention
======================  ======================================================================

Decode semantics: ``num_queries`` query positions are spread over the second half of the text.
The query at position ``p`` attends tokens ``0 .. p`` (its own key included, as in decoding) from
a cache of ``p + 1`` tokens, of which ``floor((p + 1) / R) * R`` are quantized and the rest sit
in the residual window. The cache is built once per (layer, configuration) by
:func:`oscar.quantize_kv` and streamed forward with ``cache.append`` between queries, so each
query sees exactly the cache a decode loop would hold. The captured tensors are quantized as the
model produced them (float32; a bf16 model's values are exact in float32).

Token norm imbalance (per layer, from the exact tensors): the spread of the key norm ``n_t`` (over
all KV heads, OScaR's token scope) as the standard deviation of ``log n_t``; the lowest-norm tokens
and the share of attention they receive; the sinks (tokens that receive at least
``SINK_MIN_SHARE`` of the decode queries' attention on average) with their norm; and channel
outliers (channels whose RMS exceeds ``OUTLIER_CHANNEL_FACTOR`` times the median channel of
their head).

The recommendation rule (also in docs/algorithm.md, "Reading the doctor's report"):

1. per bit budget (INT2, INT4): the configuration with the lowest attention-output error, averaged
   over layers;
2. the per-layer plan starts from the INT2 winner everywhere; a layer whose INT2 error exceeds
   ``KEEP_FACTOR`` times the median over layers is moved to the INT4 winner, and left unquantized
   (bf16) if its INT4 error also exceeds ``KEEP_FACTOR`` times the INT4 median;
3. the plan's memory is the mean over layers of ``OScaRConfig.bits_per_element`` (16 for an
   unquantized layer), the quantized part of the cache (the residual window adds R 16-bit tokens
   per layer whatever the plan).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from . import api
from .config import OScaRConfig
from .layer_configs import (  # noqa: F401 - load/save re-exported: oscar.doctor.load_layer_configs
    layer_configs_to_dict,
    load_layer_configs,
    plan_bits_per_element,
    save_layer_configs,
)
from .report import rel_err, sqnr_db

_KIVI = dict(rotate_keys=False, scale_tokens=False, rotate_values=False)


def _ablation(bits: int):
    base = OScaRConfig(key_bits=bits, value_bits=bits)
    return ((f"KIVI INT{bits}", base.replace(**_KIVI)),
            (f"rotation-only INT{bits}", base.replace(scale_tokens=False)),
            (f"scaling-only INT{bits}", base.replace(rotate_keys=False)),
            (f"OScaR INT{bits}", base),
            (f"OScaR-head INT{bits}", base.replace(norm_scope="head")))


#: The configurations measured on every layer: the paper's ablation (KIVI-style, rotation only,
#: scaling only, OScaR with the token and the per-head norm scope) at INT2 and INT4.
CONFIGS = _ablation(2) + _ablation(4)
#: Bit budgets of the recommendation (key_bits == value_bits of the candidates).
BUDGETS = (2, 4)
#: Decode queries per layer: 16 positions spread over the second half keep a 1B-class model at 2K
#: tokens within minutes on a CPU, and give 16 x num_q_heads attention distributions per layer.
NUM_QUERIES = 16
#: Default text length: the issue's target (2K tokens), 16 residual windows of 128.
DEFAULT_TOKENS = 2048
#: How many lowest-norm tokens the report names, and at most how many sinks.
NUM_LOW_NORM = 4
NUM_SINKS = 4
#: A sink receives at least this share of a decode query's attention on average: at 2K tokens
#: that is 100x the uniform share, and on trained LLMs the first token typically takes 20-90%.
SINK_MIN_SHARE = 0.05
#: A channel is an outlier when its RMS over tokens exceeds this multiple of its head's median
#: channel RMS (the few large-magnitude key channels of real LLMs are 5-20x the median).
OUTLIER_CHANNEL_FACTOR = 4.0
#: A layer is kept at higher precision when its error exceeds this multiple of the median over
#: layers: a layer twice as bad as the typical one dominates the model's error budget.
KEEP_FACTOR = 2.0


def min_tokens(configs=CONFIGS) -> int:
    """Shortest text the doctor accepts: two residual windows, so that every decode query (the
    second half of the text) sees at least one quantized window."""
    return 2 * max(cfg.residual_length for _, cfg in configs)


def query_positions(seq_len: int, num_queries: int = NUM_QUERIES) -> np.ndarray:
    """``num_queries`` distinct positions spread evenly over ``[seq_len // 2, seq_len - 1]``."""
    pos = np.linspace(seq_len // 2, seq_len - 1, num_queries).round().astype(np.int64)
    return np.unique(pos)


@dataclasses.dataclass
class Metrics:
    """One configuration on one layer (definitions in the module docstring)."""

    key_err: float
    value_err: float
    logit_err: float
    kl: float
    attn_err: float
    sqnr_db: float


@dataclasses.dataclass
class LayerStats:
    """Token norm imbalance of one layer (definitions in the module docstring)."""

    norm_spread: float
    min_norm_ratio: float
    max_norm_ratio: float
    low_norm_tokens: list
    low_norm_share: float
    sinks: list  # [{"token", "share", "norm_ratio"}], highest share first
    channel_outlier_ratio: float
    outlier_channels: int
    sliding_window: int | None


class _Exact:
    """Float64 exact attention of the decode queries over the unquantized K/V of one layer."""

    def __init__(self, q, k, v, positions, scale):
        b, hq, npos, d = q.shape
        self.h, self.group = k.shape[1], hq // k.shape[1]
        self.scale, self.positions = scale, positions
        self.qg = q.astype(np.float64).reshape(b, self.h, self.group, npos, d)
        self.visible = np.arange(k.shape[2])[None, :] <= positions[:, None]  # [P, T]
        self.s = self.logits(k)
        self.p, self.lse = _softmax(self.s, self.visible)
        vg = v.astype(np.float64)
        self.out = np.einsum("bhgpt,bhtd->bhgpd", self.p, vg).reshape(q.shape)

    def logits(self, k):
        """``scale * q . k`` per (batch, KV head, group member, query, token), float64."""
        return self.scale * np.einsum("bhgpd,bhtd->bhgpt", self.qg, k.astype(np.float64))


def _softmax(s, visible):
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    tot = e.sum(axis=-1, keepdims=True)
    return e / tot, m + np.log(tot)


def key_norms(k) -> np.ndarray:
    """``||k_t||`` over all KV heads and channels (OScaR's token scope), ``[seq_len]``, batch 0."""
    return np.sqrt((k[0].astype(np.float64) ** 2).sum(axis=(0, 2)))


def token_norm_stats(k, exact: _Exact, sliding_window=None) -> LayerStats:
    """Token norm imbalance of keys ``k [1, num_kv_heads, seq_len, head_dim]``."""
    k64 = k[0].astype(np.float64)
    n = key_norms(k)
    med = float(np.median(n))
    safe = np.maximum(n, np.finfo(np.float64).tiny)
    share = exact.p.mean(axis=(0, 1, 2, 3))  # [T]: mean over heads and decode queries
    low = np.sort(np.argsort(n, kind="stable")[:NUM_LOW_NORM])
    top = np.argsort(-share, kind="stable")[:NUM_SINKS]
    sinks = [dict(token=int(t), share=float(share[t]), norm_ratio=float(n[t] / med))
             for t in top if share[t] >= SINK_MIN_SHARE]
    rms = np.sqrt((k64**2).mean(axis=1))  # [H, D]
    rms_med = np.median(rms, axis=1, keepdims=True)
    ratio = rms.max(axis=1) / np.maximum(rms_med[:, 0], np.finfo(np.float64).tiny)
    return LayerStats(
        norm_spread=float(np.std(np.log(safe))), min_norm_ratio=float(n.min() / med),
        max_norm_ratio=float(n.max() / med), low_norm_tokens=[int(t) for t in low],
        low_norm_share=float(share[low].sum()), sinks=sinks,
        channel_outlier_ratio=float(ratio.max()),
        outlier_channels=int((rms > OUTLIER_CHANNEL_FACTOR * rms_med).sum()),
        sliding_window=sliding_window)


def evaluate_config(q, k, v, positions, scale, config: OScaRConfig, exact: _Exact) -> Metrics:
    """Measure ``config`` on one layer: stream the cache through the decode queries."""
    b, hq, npos, d = q.shape
    outs, quantized = [], []
    cache, filled = None, 0
    for i, p in enumerate(positions):
        if cache is None:
            cache = api.quantize_kv(k[:, :, : p + 1], v[:, :, : p + 1], config)
        else:
            cache.append(k[:, :, filled : p + 1], v[:, :, filled : p + 1])
        filled = p + 1
        outs.append(api.decode_attention(q[:, :, i : i + 1], cache, scale=scale))
        quantized.append(cache.quantized_len)
    if filled < k.shape[2]:
        cache.append(k[:, :, filled:], v[:, :, filled:])
    k_hat, v_hat = api.dequantize_kv(cache)
    tq = cache.quantized_len
    out = np.concatenate(outs, axis=2)

    # The quantized part of the cache at query i is the first quantized[i] tokens of the final
    # cache (blocks are independent); later tokens were still raw in the residual window.
    tq_i = np.asarray(quantized)[:, None]
    in_quant = np.arange(k.shape[2])[None, :] < tq_i  # [P, T]
    s_hat = np.where(in_quant, exact.logits(k_hat), exact.s)
    p_hat, lse_hat = _softmax(s_hat, exact.visible)
    diff = np.where(in_quant & exact.visible, s_hat - exact.s, 0.0)
    n_logits = hq * int((in_quant & exact.visible).sum())
    log_ratio = np.where(exact.visible, (exact.s - exact.lse) - (s_hat - lse_hat), 0.0)
    kl = (exact.p * log_ratio).sum(axis=-1)
    err = rel_err(out, exact.out)
    return Metrics(key_err=rel_err(k_hat[:, :, :tq], k[:, :, :tq]),
                   value_err=rel_err(v_hat[:, :, :tq], v[:, :, :tq]),
                   logit_err=float(np.sqrt((diff**2).sum() / max(n_logits, 1))),
                   kl=float(kl.mean()), attn_err=err, sqnr_db=sqnr_db(err))


def evaluate_layer(layer, positions, configs=CONFIGS, progress=None):
    """``(LayerStats, {name: Metrics})`` of one :class:`oscar._capture.LayerQKV`."""
    exact = _Exact(layer.q, layer.k, layer.v, positions, layer.scale)
    stats = token_norm_stats(layer.k, exact, layer.sliding_window)
    metrics = {}
    for name, cfg in configs:
        metrics[name] = evaluate_config(layer.q, layer.k, layer.v, positions, layer.scale,
                                        cfg, exact)
        if progress is not None:
            progress.update(1)
    return stats, metrics


@dataclasses.dataclass
class Recommendation:
    """The rule's outcome (module docstring): winners per budget and the per-layer plan."""

    best: dict  # bits -> config name
    plan: list  # per layer: config name, or None (unquantized)
    flagged: list  # layers moved off the INT2 winner
    configs: list  # per layer: OScaRConfig or None
    bits_per_element: float
    mean_attn_err: float


def recommend(metrics, configs=CONFIGS, num_kv_heads: int = 8, head_dim: int = 128,
              keep_factor: float = KEEP_FACTOR) -> Recommendation:
    """Apply the recommendation rule to per-layer metrics ``[{name: Metrics}]``."""
    by_name = dict(configs)
    mean = {name: float(np.mean([m[name].attn_err for m in metrics])) for name, _ in configs}
    best = {}
    for bits in BUDGETS:
        names = [n for n, c in configs if c.key_bits == bits and c.value_bits == bits]
        if names:
            best[bits] = min(names, key=lambda n: mean[n])
    low, high = best[min(best)], best[max(best)]
    e_low = np.array([m[low].attn_err for m in metrics])
    e_high = np.array([m[high].attn_err for m in metrics])
    plan, flagged, errs = [], [], []
    for i in range(len(metrics)):
        if low == high or e_low[i] <= keep_factor * np.median(e_low):
            plan.append(low)
            errs.append(e_low[i])
            continue
        flagged.append(i)
        keep = e_high[i] > keep_factor * np.median(e_high)
        plan.append(None if keep else high)
        errs.append(0.0 if keep else e_high[i])
    cfgs = [None if n is None else by_name[n] for n in plan]
    return Recommendation(best=best, plan=plan, flagged=flagged, configs=cfgs,
                          bits_per_element=plan_bits_per_element(cfgs, num_kv_heads, head_dim),
                          mean_attn_err=float(np.mean(errs)))


@dataclasses.dataclass
class DoctorReport:
    """Everything ``oscar report --model`` prints and writes."""

    model: str
    model_type: str
    dtype: str
    device: str
    token_source: str
    num_tokens: int
    positions: list
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    configs: tuple
    stats: list  # per layer: LayerStats
    metrics: list  # per layer: {name: Metrics}
    recommendation: Recommendation
    seconds: dict
    norms: list  # per layer: key_norms (for the plots; not in the JSON)

    @property
    def num_layers(self) -> int:
        return len(self.stats)

    def bits(self, name: str) -> float:
        return dict(self.configs)[name].bits_per_element(self.num_kv_heads, self.head_dim)

    def mean(self, name: str, field: str) -> float:
        return float(np.mean([getattr(m[name], field) for m in self.metrics]))

    def worst_layer(self, name: str) -> int:
        return int(np.argmax([m[name].attn_err for m in self.metrics]))


def diagnose(model: str, text: str | None = None, text_name: str | None = None,
             tokens: int = DEFAULT_TOKENS, device: str = "cpu", configs=CONFIGS,
             num_queries: int = NUM_QUERIES, progress: bool = True) -> DoctorReport:
    """Load ``model`` (a directory or hub name), capture its Q/K/V on ``text`` (default: the
    built-in prose) and measure ``configs`` on every layer. See the module docstring."""
    from . import _capture

    need = min_tokens(configs)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < need:
        raise ValueError(f"--tokens: expected an int >= {need} (two residual windows), "
                         f"got {tokens!r}")
    t0 = time.perf_counter()
    config = _capture.load_config(model)
    net, tokenizer = _capture.load_model(model, config, device)
    text_cfg = net.config.get_text_config()
    head_dim = getattr(text_cfg, "head_dim", None) or (
        text_cfg.hidden_size // text_cfg.num_attention_heads)
    for _, cfg in configs:  # fail before the forward pass, not after it
        cfg.check_head_dim(head_dim)
    ids, source = _capture.token_ids(tokenizer, text_cfg.vocab_size, tokens, text, text_name)
    if ids.size < need:
        raise ValueError(f"--text {text_name}: {ids.size} tokens, shorter than the {need} the "
                         f"report needs (two residual windows of "
                         f"{need // 2} tokens); give a longer text")
    positions = query_positions(int(ids.size), num_queries)
    t1 = time.perf_counter()
    bar = _capture.progress_bar(text_cfg.num_hidden_layers, "capture", progress)
    try:
        layers = _capture.capture(net, ids, positions, bar)
    finally:
        if bar is not None:
            bar.close()
    dtype = str(next(net.parameters()).dtype).replace("torch.", "")
    del net
    t2 = time.perf_counter()
    _, hq, _, d = layers[0].q.shape
    h = layers[0].k.shape[1]
    for _, cfg in configs:
        cfg.check_head_dim(d)
    bar = _capture.progress_bar(len(layers) * len(configs), "quantize", progress)
    stats, metrics, norms = [], [], []
    try:
        for layer in layers:
            s, m = evaluate_layer(layer, positions, configs, bar)
            stats.append(s)
            metrics.append(m)
            norms.append(key_norms(layer.k))
    finally:
        if bar is not None:
            bar.close()
    t3 = time.perf_counter()
    rec = recommend(metrics, configs, h, d)
    return DoctorReport(
        model=model, model_type=config.model_type, dtype=dtype, device=device,
        token_source=source, num_tokens=int(ids.size), positions=[int(p) for p in positions],
        num_q_heads=hq, num_kv_heads=h, head_dim=d, configs=tuple(configs), stats=stats,
        metrics=metrics, recommendation=rec,
        seconds=dict(load=t1 - t0, capture=t2 - t1, quantize=t3 - t2), norms=norms)


# --- text output ------------------------------------------------------------------------------

def _table(columns, rows) -> str:
    """Markdown table; ``columns`` are (header, cell function); widths fit the contents."""
    cells = [[f(r) for _, f in columns] for r in rows]
    widths = [max([len(h)] + [len(c[j]) for c in cells]) for j, (h, _) in enumerate(columns)]
    fmt = lambda row: "| " + " | ".join(  # noqa: E731 - first column left, numbers right
        c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt([h for h, _ in columns]), rule, *map(fmt, cells)])


def format_report(rep: DoctorReport) -> str:
    """The report as text (Markdown tables)."""
    r = rep.recommendation
    pos = rep.positions
    lines = [
        f"model {rep.model} ({rep.model_type}): {rep.num_layers} layers, {rep.num_q_heads} query / "
        f"{rep.num_kv_heads} KV heads, head_dim {rep.head_dim}; run in {rep.dtype} on "
        f"{rep.device}",
        f"text: {rep.token_source}; {rep.num_tokens} tokens",
        f"{len(pos)} decode queries at positions {pos[0]}..{pos[-1]}, each over its own cache "
        f"(residual window {rep.configs[0][1].residual_length}); errors are means over layers",
        "",
    ]
    overall = [(name, rep.bits(name)) for name, _ in rep.configs]
    cols = (("config", lambda x: x[0]),
            ("bits/el", lambda x: f"{x[1]:.2f}"),
            ("key err", lambda x: f"{rep.mean(x[0], 'key_err'):.4f}"),
            ("logit err", lambda x: f"{rep.mean(x[0], 'logit_err'):.4f}"),
            ("KL", lambda x: f"{rep.mean(x[0], 'kl'):.2e}"),
            ("attn err", lambda x: f"{rep.mean(x[0], 'attn_err'):.4f}"),
            ("SQNR dB", lambda x: f"{sqnr_db(rep.mean(x[0], 'attn_err')):.1f}"),
            ("worst layer", lambda x: _worst(rep, x[0])))
    lines += [_table(cols, overall), ""]
    low = r.best[min(r.best)]
    kivi = next((n for n, c in rep.configs if c.is_kivi and c.key_bits == min(r.best)), low)
    cols = (("layer", lambda i: str(i)),
            ("norm spread", lambda i: f"{rep.stats[i].norm_spread:.3f}"),
            ("min/med", lambda i: f"{rep.stats[i].min_norm_ratio:.3f}"),
            ("lowest-norm tokens: share", lambda i: _low(rep.stats[i])),
            ("sinks token:share(norm/med)", lambda i: _sinks(rep.stats[i])),
            ("ch. outliers", lambda i: f"{rep.stats[i].outlier_channels} "
                                          f"(x{rep.stats[i].channel_outlier_ratio:.1f})"),
            *((n, lambda i, n=n: f"{rep.metrics[i][n].attn_err:.4f}")
              for n in dict.fromkeys((kivi, low))),
            ("plan", lambda i: r.plan[i] or "unquantized"))
    lines += ["Per layer (norms over all KV heads; attention shares are means over decode "
              "queries and heads; last columns: attn err):", _table(cols, range(rep.num_layers)),
              ""]
    windows = sorted({s.sliding_window for s in rep.stats if s.sliding_window})
    if windows:
        lines += [f"note: layers with sliding windows {windows} were measured with full causal "
                  "attention (the OScaR cache has no window)", ""]
    lines += [
        "Recommendation (lowest mean attn err per budget; layers above "
        f"{KEEP_FACTOR:g}x the median INT2 error move up):",
        *(f"  INT{b} budget: {n} (attn err {rep.mean(n, 'attn_err'):.4f}, {rep.bits(n):.2f} "
          f"bits/el; {_vs(rep, n, b)})" for b, n in sorted(r.best.items())),
        "  layers kept at higher precision: " + (", ".join(
            f"{i} ({r.plan[i] or 'unquantized'})" for i in r.flagged) or "none"),
        f"  plan: {r.bits_per_element:.2f} bits/element on average ({16 / r.bits_per_element:.2f}x"
        f" smaller than bf16), mean attn err {r.mean_attn_err:.4f}",
    ]
    return "\n".join(lines)


def _worst(rep, name):
    i = rep.worst_layer(name)
    return f"{i} ({rep.metrics[i][name].attn_err:.3f})"


def _vs(rep, name, bits):
    kivi = next((n for n, c in rep.configs if c.is_kivi and c.key_bits == bits), None)
    if kivi is None or kivi == name:
        return "KIVI-style is the best here"
    ratio = rep.mean(name, "attn_err") / rep.mean(kivi, "attn_err")
    return f"{name}/{kivi} attn err {ratio:.3f}"


def _low(s: LayerStats) -> str:
    return ",".join(map(str, s.low_norm_tokens[:3])) + f": {s.low_norm_share:.3f}"


def _sinks(s: LayerStats) -> str:
    if not s.sinks:
        return "none"
    return " ".join(f"{x['token']}:{x['share']:.2f}({x['norm_ratio']:.2f})" for x in s.sinks[:2])


# --- JSON -------------------------------------------------------------------------------------

def _clean(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(rep: DoctorReport) -> dict:
    """The per-layer plan in the ``oscar-layer-configs`` format, with the report under
    ``"report"`` (ignored by :func:`oscar.layer_configs.load_layer_configs`)."""
    r = rep.recommendation
    body = dict(
        model=rep.model, model_type=rep.model_type, dtype=rep.dtype, device=rep.device,
        text=rep.token_source, num_tokens=rep.num_tokens, query_positions=rep.positions,
        num_q_heads=rep.num_q_heads, num_kv_heads=rep.num_kv_heads, head_dim=rep.head_dim,
        configs=[dict(name=n, config=dataclasses.asdict(c), bits_per_element=rep.bits(n),
                      **{f: rep.mean(n, f) for f in ("key_err", "value_err", "logit_err", "kl",
                                                      "attn_err", "sqnr_db")})
                 for n, c in rep.configs],
        layers=[dict(layer=i, **dataclasses.asdict(s),
                     metrics={n: dataclasses.asdict(m) for n, m in rep.metrics[i].items()})
                for i, s in enumerate(rep.stats)],
        recommendation=dict(best={f"INT{b}": n for b, n in r.best.items()}, plan=r.plan,
                            flagged=r.flagged, keep_factor=KEEP_FACTOR,
                            bits_per_element=r.bits_per_element,
                            mean_attn_err=r.mean_attn_err),
        seconds=rep.seconds)
    return layer_configs_to_dict(r.configs, r.bits_per_element, report=_clean(body))
