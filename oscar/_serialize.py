"""Packed caches to and from safetensors files: the arrays of docs/format.md plus a JSON header.

One file holds one or more layers (a :class:`QuantizedKVCache`, a dense layer, or an empty one).
safetensors metadata (strings only):

* ``format``: ``"oscar-kv-cache"``; ``version``: ``"1"`` (:data:`FORMAT_VERSION`);
* ``layers``: a JSON list, one entry per layer: ``null`` (empty layer), ``{"kind": "dense",
  "dtype", "shape"}`` or ``{"kind": "oscar", "config": {OScaRConfig fields}, "batch",
  "num_kv_heads", "head_dim", "dtype", "quantized_len", "residual_len", "extra": {...}}``;
* ``extra``: a JSON object for the caller (the transformers integration's per-row padding).

Tensors of quantized layer i: ``layers.i.k_codes`` (uint32), ``.k_params``, ``.v_codes``
(uint32), ``.v_params`` (the param dtype), ``.norms`` (float32, only with token scaling),
``.k_residual``, ``.v_residual`` (float16, or float32 for float32 and bfloat16 caches: NumPy has
no bfloat16 and float32 holds bfloat16 values exactly). Dense layer i: ``layers.i.keys``,
``layers.i.values`` (bfloat16 stored as float32, exactly). Every array is checked against the
shape and dtype the header implies before anything is built, so a file of another version, a
truncated file or a mismatched array is a ValueError, never a cache of garbage.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from . import _validate as V
from .cache import QuantizedKVCache
from .config import OScaRConfig

FORMAT = "oscar-kv-cache"
#: Bump when the header or an array's meaning changes; readers refuse other versions.
FORMAT_VERSION = 1

_PACKED = ("k_codes", "k_params", "v_codes", "v_params", "norms")
_RESIDUAL_NP = {"float16": np.float16, "float32": np.float32, "bfloat16": np.float32}


def _np(x) -> np.ndarray:
    """Host NumPy copy of a NumPy array or torch tensor (codes as uint32 bits, bf16 as f32)."""
    if V.is_torch(x):
        import torch

        t = x.detach()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        a = t.cpu().contiguous().numpy()
        return a.view(np.uint32) if a.dtype == np.int32 else a
    return np.ascontiguousarray(x)


def layer_entry(cache: QuantizedKVCache, extra: dict | None = None):
    """``(header entry, {name: array})`` of one quantized layer."""
    p = cache.packed()
    arrays = {n: _np(a) for n, a in p.arrays().items()}
    k_res, v_res = cache.residual()
    rdt = _RESIDUAL_NP[cache.dtype]
    arrays["k_residual"] = _np(k_res).astype(rdt)
    arrays["v_residual"] = _np(v_res).astype(rdt)
    head = dict(kind="oscar", config=dataclasses.asdict(cache.config), batch=cache.batch,
                num_kv_heads=cache.num_kv_heads, head_dim=cache.head_dim, dtype=cache.dtype,
                quantized_len=cache.quantized_len, residual_len=cache.residual_len,
                extra=extra or {})
    return head, arrays


def dense_entry(keys, values):
    """``(header entry, arrays)`` of a dense layer holding ``keys, values [B, H, T, D]``."""
    return (dict(kind="dense", dtype=V.dtype_name(keys), shape=list(keys.shape)),
            {"keys": _np(keys), "values": _np(values)})


def save_caches(path, entries, extra: dict | None = None) -> None:
    """Write layers (``None`` or ``(header, arrays)`` from :func:`layer_entry`/:func:`dense_entry`)."""
    from safetensors.numpy import save_file

    heads, tensors = [], {}
    for i, e in enumerate(entries):
        if e is None:
            heads.append(None)
            continue
        head, arrays = e
        heads.append(head)
        for name, a in arrays.items():
            tensors[f"layers.{i}.{name}"] = np.ascontiguousarray(a)
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "layers": json.dumps(heads),
            "extra": json.dumps(extra or {})}
    save_file(tensors, os.fspath(path), metadata=meta)


def _read(path):
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated or not a safetensors file: the library's own message
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: "
                         f"{exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: expected an oscar cache file (metadata format={FORMAT!r}), "
                         f"got format={meta.get('format')!r}")
    if meta.get("version") != str(FORMAT_VERSION):
        raise ValueError(f"{path}: cache file format version {meta.get('version')!r}; this oscar "
                         f"reads version {FORMAT_VERSION} only")
    try:
        heads = json.loads(meta["layers"])
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable cache header ({exc})") from exc
    if not isinstance(heads, list):
        raise ValueError(f"{path}: expected a list of layers in the header, got {type(heads)}")
    return heads, extra, arrays


def _expected_packed(head, config: OScaRConfig) -> dict:
    """name -> (shape, dtype) of a quantized layer's arrays, from its header."""
    b, h, d = head["batch"], head["num_kv_heads"], head["head_dim"]
    t, r = head["quantized_len"], head["residual_len"]
    pd = np.float16 if config.param_dtype == "float16" else np.float32
    s = 1 if config.norm_scope == "token" else h
    out = dict(
        k_codes=((b, h, t // 32, d * config.key_bits // 32, 32), np.uint32),
        k_params=((b, h, t // config.key_group_size, d, 2), pd),
        v_codes=((b, h, t, d * config.value_bits // 32), np.uint32),
        v_params=((b, h, t, d // config.value_group_size, 2), pd),
        k_residual=((b, h, r, d), _RESIDUAL_NP[head["dtype"]]),
        v_residual=((b, h, r, d), _RESIDUAL_NP[head["dtype"]]),
    )
    if config.scale_tokens:
        out["norms"] = ((b, s, t), np.float32)
    return out


def _check_arrays(path, i, arrays, expected):
    prefix = f"layers.{i}."
    have = {k[len(prefix):] for k in arrays if k.startswith(prefix)}
    if have != set(expected):
        raise ValueError(f"{path}: layer {i}: expected arrays {sorted(expected)}, got "
                         f"{sorted(have)}")
    for name, (shape, dt) in expected.items():
        a = arrays[prefix + name]
        if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dt):
            raise ValueError(f"{path}: layer {i}: array {name}: expected shape {tuple(shape)} "
                             f"dtype {np.dtype(dt).name} (from the header), got "
                             f"{tuple(a.shape)} {a.dtype.name}")


def _build_quantized(path, i, head, arrays, device):
    try:
        config = OScaRConfig(**head["config"])
        b, h, d = (int(head[k]) for k in ("batch", "num_kv_heads", "head_dim"))
        t, r, dt = int(head["quantized_len"]), int(head["residual_len"]), head["dtype"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: layer {i}: bad header entry ({exc})") from exc
    config.check_head_dim(d)
    if dt not in V.FLOAT_DTYPES or min(b, h) <= 0 or t < 0 or t % config.residual_length \
            or not 0 <= r < config.residual_length:
        raise ValueError(f"{path}: layer {i}: inconsistent header (batch {b}, heads {h}, dtype "
                         f"{dt!r}, quantized_len {t}, residual_len {r}, residual_length "
                         f"{config.residual_length})")
    _check_arrays(path, i, arrays, _expected_packed(head, config))
    p = f"layers.{i}."
    packed = {n: arrays[p + n] for n in _PACKED if p + n in arrays}
    k_res, v_res = arrays[p + "k_residual"], arrays[p + "v_residual"]
    on_cuda = device is not None and str(device).startswith("cuda")
    if on_cuda:
        import torch

        from .api import _numba_backend

        bridge = _numba_backend()
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        store = bridge.NumbaStore(b, h, d, dt, config, dev, capacity=t)
        store.load_state(packed, k_res, v_res, t)
        return QuantizedKVCache(store, b, h, d, dt, config, device=str(dev))
    if device not in (None, "cpu"):
        raise ValueError(f"device: expected None, 'cpu' or a CUDA device, got {device!r}")
    cache = QuantizedKVCache.empty(b, h, d, dt, config)
    cache._store.load_state(packed, k_res, v_res, t)
    return cache


def load_caches(path, device=None):
    """``(layers, extra)``: each layer a QuantizedKVCache (on ``device``), ``(keys, values,
    dtype)`` NumPy arrays of a dense layer, or None; ``extra`` is the file's extra dict plus
    ``"layer_extra"``, each layer's own ``extra`` (None for non-quantized layers)."""
    heads, extra, arrays = _read(path)
    layers = []
    for i, head in enumerate(heads):
        if head is None:
            layers.append(None)
        elif head.get("kind") == "oscar":
            layers.append(_build_quantized(path, i, head, arrays, device))
        elif head.get("kind") == "dense":
            shape, dt = tuple(head["shape"]), head["dtype"]
            want = {n: (shape, _RESIDUAL_NP.get(dt, np.float32)) for n in ("keys", "values")}
            _check_arrays(path, i, arrays, want)
            layers.append((arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"], dt))
        else:
            raise ValueError(f"{path}: layer {i}: unknown layer kind {head.get('kind')!r}")
    extra = dict(extra)
    extra["layer_extra"] = [h.get("extra", {}) if isinstance(h, dict) else None for h in heads]
    return layers, extra
