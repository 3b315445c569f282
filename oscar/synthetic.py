"""Keys, values and queries with Token Norm Imbalance (TNI): synthetic, or loaded from a file.

:func:`make_tni_kv` draws a seeded, deterministic stand-in for one attention layer of a text LLM
at a decode step; :func:`load_kv` reads user K/V from ``.npz`` or ``.safetensors``. Both return a
:class:`SyntheticKV` (float32 NumPy arrays, the shapes of :func:`oscar.quantize_kv` and
:func:`oscar.decode_attention`).

The synthetic model has the three features the paper builds on (SPEC section 1):

* **Key bias on a few large channels.** Ordinary keys share a per-head mean vector ``mu`` that
  lives on ``outlier_channels`` channels of magnitude ``outlier_scale`` (the fixed large-magnitude
  channels of real LLM keys), plus unit Gaussian content on every channel.
* **Log-normal token norms.** Each ordinary token's key is multiplied by a log-normal factor shared
  by all KV heads (``norm_sigma``) and a smaller per-head one (``head_norm_sigma``). By default the
  factor scales the whole key, bias included; ``bias_follows_norm=False`` scales only the content
  (a constant bias, as RMSNorm-ed hidden states would give), and then OScaR's gain over KIVI on
  this data mostly disappears: see docs/algorithm.md for the measured sensitivity.
* **Low-norm attention sinks.** ``num_sinks`` tokens (the first token and delimiter-like tokens
  further on) have keys of norm ``sink_norm_ratio`` times the median ordinary key norm, orthogonal
  to the key bias, and small values (``sink_value_ratio``: attending a sink is close to a no-op).
  The sinks still take a large share of attention because each query is anti-aligned with the key
  bias: ordinary tokens, which carry the bias, get low logits, and the sinks, which sit near the
  origin, do not. The strength of that anti-alignment is solved per query head so that the sinks
  receive ``sink_mass`` of the full-precision softmax mass.

Why not a query aligned with a sink direction instead: a low-norm sink would then need a query
many times longer than the keys, and that long query multiplies every key's quantization error
along its direction, so every 2-bit configuration would look broken. The anti-aligned bias needs
only a moderate query, and is one common reading of how low-norm sinks attract attention.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np

#: Bisection steps for the query's anti-alignment strength (the mass is monotone in it);
#: 60 halvings take the bracket below float64 resolution.
_BISECT_STEPS = 60
#: Delimiter-like sinks after the first token are drawn from this leading share of the sequence,
#: so that at the default sizes they land in the quantized part, not in the residual window.
_SINK_SPAN = 0.75
#: Relative noise on each sink key's direction: sinks point the same way, but not identically.
_SINK_DIRECTION_NOISE = 0.1


@dataclasses.dataclass(frozen=True)
class SyntheticKV:
    """One layer's keys, values and decode queries (float32 NumPy).

    Attributes:
        k, v: ``[batch, num_kv_heads, seq_len, head_dim]``.
        q: ``[batch, num_q_heads, q_len, head_dim]`` (q_len = 1 for the synthetic data).
        sink_positions: int64 token indices of the attention-sink tokens (sorted).
        description: one line saying where the data came from and with which settings.
    """

    k: np.ndarray
    v: np.ndarray
    q: np.ndarray
    sink_positions: np.ndarray
    description: str


def make_tni_kv(batch: int = 1, num_kv_heads: int = 8, num_q_heads: int = 32,
                seq_len: int = 1024, head_dim: int = 128, num_sinks: int = 4, seed: int = 0,
                norm_sigma: float = 0.25, head_norm_sigma: float = 0.1,
                outlier_channels: int = 4, outlier_scale: float = 6.0,
                sink_norm_ratio: float = 0.15, sink_mass: float = 0.4,
                query_sigma: float = 0.5, value_sigma: float = 0.2,
                sink_value_ratio: float = 0.1, bias_follows_norm: bool = True) -> SyntheticKV:
    """Seeded synthetic K/V/Q of one layer with Token Norm Imbalance and low-norm sinks.

    Same arguments, same arrays (NumPy ``default_rng(seed)``). Per batch row and KV head ``h``
    (``G = num_q_heads // num_kv_heads`` query heads read it):

    * ``mu_h``: zero except on ``outlier_channels`` distinct random channels, where it is
      ``+-outlier_scale`` (random signs).
    * ordinary token t: ``k_t = m_t * s_ht * (mu_h + z_t)`` (``bias_follows_norm=False``:
      ``s_ht * (mu_h + m_t * z_t)``), ``z_t ~ N(0, I)``, ``m_t = exp(norm_sigma * N(0,1))``
      shared by all heads, ``s_ht = exp(head_norm_sigma * N(0,1))`` per head;
      ``v_t = exp(value_sigma * N(0,1)) * N(0, I)``.
    * sink token: ``k = sink_norm_ratio * median_t ||k_t|| * unit(e)``, ``e`` one random direction
      per head (orthogonal to ``mu_h``), perturbed by 10% per sink; ``v = sink_value_ratio * N(0, I)``.
    * query head j of the group: ``q = -a_j * unit(mu_h) + query_sigma * w_j``, ``w_j ~ N(0, I)``
      with its ``mu_h`` component removed; ``a_j >= 0`` is solved by bisection so that the sinks
      get ``sink_mass`` of the softmax mass at scale ``1/sqrt(head_dim)``.

    Args:
        batch, num_kv_heads, num_q_heads, seq_len, head_dim: shapes; num_q_heads must be a
            multiple of num_kv_heads (GQA).
        num_sinks: sink tokens (default 4): token 0, and ``num_sinks - 1`` distinct random tokens
            in the first 75% of the sequence (0 <= num_sinks <= seq_len).
        seed: seed of ``numpy.random.default_rng`` (default 0).
        norm_sigma: log-normal sigma of ordinary key norms across tokens, shared by heads
            (default 0.25: +-1 sigma is a factor of 1.28).
        head_norm_sigma: log-normal sigma of an extra per-(token, head) norm factor (default 0.1),
            the part of TNI that a norm over all heads cannot remove.
        outlier_channels: large channels of the key bias per head (default 4; 0 disables the
            bias, and then the sinks cannot attract attention: use ``sink_mass=0``).
        outlier_scale: magnitude of those channels in units of the content's std (default 6).
        sink_norm_ratio: sink key norm over the median ordinary key norm (default 0.15).
        sink_mass: target share of softmax mass on the sinks, per query head, in [0, 1)
            (default 0.4); the achieved mean is in ``description``.
        query_sigma: per-channel std of the query's content part (default 0.5: the content
            part of an ordinary logit then has std about ``0.5 * m_t``).
        value_sigma: log-normal sigma of per-token value scale (default 0.2).
        sink_value_ratio: sink value scale relative to ordinary values (default 0.1).
        bias_follows_norm: whether the token norm factor ``m_t`` also scales the key bias
            (default True; see above).

    Returns:
        :class:`SyntheticKV` with ``q [batch, num_q_heads, 1, head_dim]``.
    """
    _check_shape_args(batch, num_kv_heads, num_q_heads, seq_len, head_dim)
    if not 0 <= num_sinks <= seq_len:
        raise ValueError(f"num_sinks: expected 0 <= num_sinks <= seq_len ({seq_len}), "
                         f"got {num_sinks}")
    if not 0 <= outlier_channels <= head_dim:
        raise ValueError(f"outlier_channels: expected 0 .. head_dim ({head_dim}), "
                         f"got {outlier_channels}")
    if not 0.0 <= sink_mass < 1.0:
        raise ValueError(f"sink_mass: expected 0 <= sink_mass < 1, got {sink_mass}")
    if sink_mass > 0 and (num_sinks == 0 or outlier_channels == 0 or outlier_scale <= 0):
        raise ValueError("sink_mass > 0 needs num_sinks > 0 and a key bias (outlier_channels > 0, "
                         "outlier_scale > 0); pass sink_mass=0 otherwise")
    for name, val in (("norm_sigma", norm_sigma), ("head_norm_sigma", head_norm_sigma),
                      ("query_sigma", query_sigma), ("value_sigma", value_sigma),
                      ("sink_norm_ratio", sink_norm_ratio), ("sink_value_ratio", sink_value_ratio),
                      ("outlier_scale", outlier_scale)):
        if not (np.isfinite(val) and val >= 0):
            raise ValueError(f"{name}: expected a finite value >= 0, got {val}")

    rng = np.random.default_rng(seed)
    b, h, hq, t, d = batch, num_kv_heads, num_q_heads, seq_len, head_dim
    sinks = _sink_positions(rng, num_sinks, t)
    is_sink = np.zeros(t, bool)
    is_sink[sinks] = True

    # key bias mu [B, H, D] on a few channels per head, and its unit direction
    mu = np.zeros((b, h, d))
    for bi in range(b):
        for hi in range(h):
            ch = rng.choice(d, size=outlier_channels, replace=False)
            mu[bi, hi, ch] = outlier_scale * rng.choice((-1.0, 1.0), size=outlier_channels)
    mu_norm = np.linalg.norm(mu, axis=-1, keepdims=True)
    mu_dir = np.divide(mu, mu_norm, out=np.zeros_like(mu), where=mu_norm > 0)

    m = np.exp(norm_sigma * rng.standard_normal((b, 1, t, 1)))
    s = np.exp(head_norm_sigma * rng.standard_normal((b, h, t, 1)))
    z = rng.standard_normal((b, h, t, d))
    k = m * s * (mu[:, :, None, :] + z) if bias_follows_norm else s * (mu[:, :, None, :] + m * z)
    v = np.exp(value_sigma * rng.standard_normal((b, 1, t, 1))) * rng.standard_normal((b, h, t, d))

    if num_sinks:
        # the reference norm: median over ordinary tokens (over all drawn keys if every token
        # is a sink, e.g. seq_len == num_sinks)
        drawn = np.linalg.norm(k, axis=-1)  # [B, H, T]
        med = np.median(drawn[:, :, ~is_sink] if (~is_sink).any() else drawn, axis=-1)
        e = _remove_component(rng.standard_normal((b, h, 1, d)), mu_dir[:, :, None, :])
        e = e + _SINK_DIRECTION_NOISE * np.linalg.norm(e, axis=-1, keepdims=True) / np.sqrt(d) \
            * rng.standard_normal((b, h, num_sinks, d))
        e = _remove_component(e, mu_dir[:, :, None, :])
        e /= np.linalg.norm(e, axis=-1, keepdims=True)
        k[:, :, sinks] = sink_norm_ratio * med[:, :, None, None] * e
        v[:, :, sinks] = sink_value_ratio * rng.standard_normal((b, h, num_sinks, d))

    w = query_sigma * rng.standard_normal((b, hq, d))
    q, masses = _queries(k, w, mu_dir, is_sink, sink_mass)
    desc = (f"synthetic TNI (seed {seed}): batch {b}, {h} KV / {hq} query heads, seq_len {t}, "
            f"head_dim {d}; {num_sinks} sinks at {sinks.tolist()[:8]}"
            f"{'...' if num_sinks > 8 else ''} with key norm x{sink_norm_ratio:g}, mean sink "
            f"attention {np.mean(masses) if masses else 0.0:.3f}; norm_sigma {norm_sigma:g}, "
            f"{outlier_channels} outlier channels x{outlier_scale:g}"
            f"{'' if bias_follows_norm else ', constant bias'}")
    return SyntheticKV(k=k.astype(np.float32), v=v.astype(np.float32),
                       q=q.astype(np.float32), sink_positions=sinks,
                       description=desc)


def _queries(k, w, mu_dir, is_sink, sink_mass):
    """Queries ``[B, Hq, 1, D]`` = content ``w`` (mu component removed) minus the solved
    anti-alignment with the key bias; also the achieved sink shares (a list, one per head)."""
    b, h, _, d = k.shape
    group = w.shape[1] // h
    w = _remove_component(w, np.repeat(mu_dir, group, axis=1))
    q = np.empty_like(w)
    scale = 1.0 / np.sqrt(d)
    masses = []
    for bi in range(b):
        for j in range(w.shape[1]):
            kh, u = k[bi, j // group], mu_dir[bi, j // group]
            a = _solve_anti_alignment(kh, w[bi, j], u, is_sink, sink_mass, scale)
            q[bi, j] = w[bi, j] - a * u
            masses.append(_sink_share(scale * (kh @ q[bi, j]), is_sink))
    return q[:, :, None, :], masses


def _check_shape_args(batch, num_kv_heads, num_q_heads, seq_len, head_dim) -> None:
    for name, val in (("batch", batch), ("num_kv_heads", num_kv_heads),
                      ("num_q_heads", num_q_heads), ("seq_len", seq_len), ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")


def _sink_positions(rng, num_sinks: int, seq_len: int) -> np.ndarray:
    if num_sinks == 0:
        return np.zeros(0, np.int64)
    span = max(num_sinks, int(_SINK_SPAN * seq_len))
    rest = rng.choice(np.arange(1, span), size=num_sinks - 1, replace=False)
    return np.sort(np.concatenate(([0], rest))).astype(np.int64)


def _remove_component(x: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """``x`` minus its projection on ``unit`` (unit vectors, or zeros: then x is unchanged)."""
    return x - np.sum(x * unit, axis=-1, keepdims=True) * unit


def _sink_share(logits: np.ndarray, is_sink: np.ndarray) -> float:
    p = np.exp(logits - logits.max())
    return float(p[is_sink].sum() / p.sum())


def _solve_anti_alignment(k, w, mu_dir, is_sink, target, scale) -> float:
    """Smallest ``a >= 0`` with sink share of ``softmax(scale * k @ (w - a mu_dir)) >= target``.

    Increasing ``a`` lowers each ordinary logit by ``a * scale * (k_t . mu_dir)`` (positive: the
    bias dominates an ordinary key's projection) and leaves the sink logits alone (sinks are
    orthogonal to mu), so the share grows with ``a``: double an upper bound, then bisect.
    """
    if target == 0:
        return 0.0
    share = lambda a: _sink_share(scale * (k @ (w - a * mu_dir)), is_sink)
    lo, hi = 0.0, 1.0
    while share(hi) < target:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            raise ValueError(f"sink_mass: cannot reach {target} with these settings "
                             "(raise outlier_scale or lower sink_mass)")
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if share(mid) < target else (lo, mid)
    return hi


# --------------------------------------------------------------------------------------------
# User data
# --------------------------------------------------------------------------------------------

#: safetensors dtype names this reader converts to float32 (bfloat16 without torch).
_SAFETENSORS_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
                       "BF16": np.dtype("<u2")}


def load_kv(path, num_q_heads: int | None = None, sink_positions=None) -> SyntheticKV:
    """Read keys, values and optional queries from ``.npz`` or ``.safetensors``.

    The file holds arrays named ``k`` and ``v`` and optionally ``q`` and ``sink_positions``:

    * ``k``, ``v``: ``[batch, num_kv_heads, seq_len, head_dim]``, or 3-D ``[num_kv_heads, seq_len,
      head_dim]`` which is read as batch = 1. Same shape; float16, bfloat16 (safetensors),
      float32 or float64, converted to float32 (values outside float32 are an error).
    * ``q``: ``[batch, num_q_heads, q_len, head_dim]`` (3-D read as batch = 1, like k), with
      num_q_heads a multiple of num_kv_heads and 1 <= q_len <= seq_len. Without ``q``, queries are
      made from keys: query head ``j`` of the group of KV head ``g`` (``G = num_q_heads //
      num_kv_heads`` heads per group) is key token ``seq_len - 1 - (j mod G)`` of KV head ``g``
      (the last G keys; token 0 if seq_len < G), a stand-in with the head's own geometry.
      ``num_q_heads`` (argument) defaults to num_kv_heads and must match a stored ``q``.
    * ``sink_positions``: int token indices; the argument overrides the file; default ``[0]``
      (the first token, the attention sink of text LLMs).

    Raises ValueError naming the file and the array for a missing array, a wrong rank or shape,
    a non-float dtype or non-finite values.
    """
    path = os.fspath(path)
    arrays = _read_arrays(path)
    for name in ("k", "v"):
        if name not in arrays:
            raise ValueError(f"{path}: expected an array named {name!r}, found "
                             f"{sorted(arrays)}")
    k = _as_rank4(path, "k", arrays["k"], "batch, num_kv_heads, seq_len, head_dim")
    v = _as_rank4(path, "v", arrays["v"], "batch, num_kv_heads, seq_len, head_dim")
    if v.shape != k.shape:
        raise ValueError(f"{path}: array 'v': expected the shape of 'k' {k.shape}, got {v.shape}")
    b, h, t, d = k.shape
    if "q" in arrays:
        q = _as_rank4(path, "q", arrays["q"], "batch, num_q_heads, q_len, head_dim",
                      allow_3d=arrays["k"].ndim == 3)
        if q.shape[0] != b or q.shape[3] != d or q.shape[1] % h or not 1 <= q.shape[2] <= t:
            raise ValueError(f"{path}: array 'q': expected [{b}, a multiple of {h}, 1 .. {t}, "
                             f"{d}] to match 'k' {k.shape}, got {q.shape}")
        if num_q_heads is not None and num_q_heads != q.shape[1]:
            raise ValueError(f"num_q_heads: expected {q.shape[1]} (the file's 'q'), "
                             f"got {num_q_heads}")
        q_note = "q from file"
    else:
        hq = h if num_q_heads is None else num_q_heads
        if isinstance(hq, bool) or not isinstance(hq, (int, np.integer)) or hq <= 0 or hq % h:
            raise ValueError(f"num_q_heads: expected a positive multiple of num_kv_heads ({h}), "
                             f"got {hq!r}")
        group = hq // h
        j = np.arange(hq)
        tok = np.maximum(t - 1 - j % group, 0)
        q = k[:, j // group, tok][:, :, None, :].copy()
        q_note = f"q = last {group} key token(s) per KV head"
    sinks = _sink_positions_arg(path, arrays, sink_positions, t)
    desc = (f"{os.path.basename(path)}: batch {b}, {h} KV / {q.shape[1]} query heads, seq_len {t}, "
            f"head_dim {d}, k dtype {arrays['k'].dtype}; {q_note}; sinks {sinks.tolist()[:8]}")
    return SyntheticKV(k=k, v=v, q=q, sink_positions=sinks, description=desc)


def _sink_positions_arg(path, arrays, sink_positions, seq_len) -> np.ndarray:
    src = "sink_positions"
    if sink_positions is None:
        sink_positions = arrays.get("sink_positions", [0])
        src = f"{path}: array 'sink_positions'"
    pos = np.asarray(sink_positions)
    if pos.ndim != 1 or not (pos.size == 0 or np.issubdtype(pos.dtype, np.integer)):
        raise ValueError(f"{src}: expected a 1-D array of int token indices, got dtype "
                         f"{pos.dtype} shape {pos.shape}")
    if pos.size and (pos.min() < 0 or pos.max() >= seq_len):
        raise ValueError(f"{src}: expected token indices in [0, {seq_len}), got {pos.tolist()}")
    return np.unique(pos.astype(np.int64))


def _as_rank4(path, name, x, dims, allow_3d=True) -> np.ndarray:
    """float32 4-D copy of a file array; a 3-D one (when allowed) gets a batch axis of 1."""
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: array {name!r}: expected a float dtype, got {x.dtype}")
    if x.ndim == 3 and allow_3d:
        x = x[None]
    if x.ndim != 4:
        want = f"4-D [{dims}]" + (" or 3-D without batch" if allow_3d else
                                 " (3-D only when 'k' is 3-D)")
        raise ValueError(f"{path}: array {name!r}: expected {want}, got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{path}: array {name!r}: expected non-empty dimensions, got {x.shape}")
    with np.errstate(over="ignore"):
        x32 = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x32).all():
        raise ValueError(f"{path}: array {name!r}: expected finite float32 values, got "
                         f"{int((~np.isfinite(x32)).sum())} NaN/Inf (after conversion)")
    return np.ascontiguousarray(x32)


def _read_arrays(path) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    raise ValueError(f"{path}: expected a .npz or .safetensors file")


def _read_safetensors(path) -> dict:
    """Minimal reader of the safetensors format (8-byte little-endian header size, JSON header,
    raw little-endian data). Float tensors come back as NumPy (bfloat16 as float32, exactly);
    integer tensors (e.g. sink_positions) as int64. Needs no torch and no safetensors package."""
    ints = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
    except (struct.error, ValueError) as exc:
        raise ValueError(f"{path}: not a safetensors file ({exc})") from exc
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dt in _SAFETENSORS_DTYPES:
            x = np.frombuffer(data[lo:hi], dtype=_SAFETENSORS_DTYPES[dt]).reshape(shape)
            x = (x.astype(np.uint32) << 16).view(np.float32) if dt == "BF16" else x
        elif dt in ints:
            x = np.frombuffer(data[lo:hi], dtype=ints[dt]).reshape(shape).astype(np.int64)
        else:
            raise ValueError(f"{path}: array {name!r}: unsupported safetensors dtype {dt}")
        out[name] = x
    return out
