"""The public verbs: quantize_kv, decode_attention, dequantize_kv.

Backend selection: NumPy arrays and CPU torch tensors run on the NumPy reference
(``backend="reference"``); CUDA torch tensors run on the Numba kernels (``backend="numba"``,
needs the ``numba`` extra). ``backend=None`` picks by the input; an explicit backend that does
not fit the input is an error, never a silent copy between devices.
"""

from __future__ import annotations

import math

import numpy as np

from . import _validate as V
from .cache import QuantizedKVCache, dequantize_reference
from .config import OScaRConfig
from .reference.attention import decode_attention as _ref_decode_attention

BACKENDS = ("reference", "numba")


def _pick_backend(backend, x, name):
    on_cuda = V.is_torch(x) and x.is_cuda
    if backend is None:
        return "numba" if on_cuda else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "reference" and on_cuda:
        raise ValueError(f"{name}: backend='reference' runs on the host, got a tensor on "
                         f"{x.device}; move it with .cpu() or use backend='numba'")
    if backend == "numba" and not on_cuda:
        raise ValueError(f"{name}: backend='numba' needs CUDA torch tensors, got "
                         f"{type(x).__name__} on {V.device_name(x)}")
    return backend


_BRIDGE = None  # the CUDA bridge module once imported (looked up on every decode step)


def _numba_backend():
    global _BRIDGE
    if _BRIDGE is not None:
        return _BRIDGE
    try:
        from . import _cuda_bridge
    except ImportError as exc:  # numba-cuda missing or broken
        raise ImportError(
            "CUDA tensors need the Numba backend: pip install 'oscar-kv[numba]' "
            f"(numba-cuda could not be imported: {exc})"
        ) from exc
    _BRIDGE = _cuda_bridge
    return _cuda_bridge


def quantize_kv(k, v, config: OScaRConfig | None = None, backend: str | None = None,
                max_seq_len: int | None = None,
                num_q_heads: int | None = None, *, seq_lens=None,
                cu_seqlens=None) -> QuantizedKVCache:
    """Quantize keys and values ``[batch, num_kv_heads, seq_len, head_dim]`` into a cache.

    The first ``floor(seq_len / R) * R`` tokens are rotated, scaled, quantized and packed; the
    rest stay in the residual window (R = ``config.residual_length``). ``seq_len`` may be 0.

    Args:
        k, v: float16, bfloat16 or float32; NumPy arrays, CPU or CUDA torch tensors.
        config: an :class:`OScaRConfig` (default: the paper's INT2 configuration).
        backend: None (by input), ``"reference"`` or ``"numba"``.
        max_seq_len: optional number of tokens to reserve packed storage for (CUDA caches grow
            geometrically otherwise; see :meth:`QuantizedKVCache.reserve`).
        num_q_heads: optional number of query heads of the decode loop. On CUDA the kernels the
            loop will launch (one window's flush; with ``num_q_heads`` also the q_len=1 decode
            kernels) are compiled or loaded from the kernel cache here, not in the loop
            (docs/api.md, "Kernel cache and warm-up"). Ignored by the reference backend.
        seq_lens: optional int ``[batch]`` (NumPy, list or torch): a variable-length batch
            without padding in the cache. Row b takes only ``k[b, :, :seq_lens[b]]`` (the rest of
            ``k``, ``v`` is right padding and is never read, nor checked);
            ``0 <= seq_lens[b] <= seq_len``. The rows keep their own lengths from then on
            (:attr:`QuantizedKVCache.seq_lens`).
        cu_seqlens: optional int ``[batch + 1]`` (NumPy, list or torch), the packed
            variable-length layout of flash-attention's varlen API: ``k, v`` are
            ``[1, num_kv_heads, total_tokens, head_dim]`` holding the prompts one after the other,
            row b is tokens ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1``; ``cu_seqlens[0] = 0``,
            non-decreasing, ``cu_seqlens[-1] = total_tokens``. Not with ``seq_lens``.

    On CUDA this synchronizes once, at the end, to raise on NaN/Inf or float16 overflow or
    underflow (the reference raises at once, also for the tokens left in the residual window).
    """
    config = OScaRConfig() if config is None else config
    if not isinstance(config, OScaRConfig):
        raise TypeError(f"config: expected OScaRConfig, got {type(config).__name__}")
    shape, dt = V.check_kv(k, v)
    b, h, t, d = shape
    config.check_head_dim(d)
    if max_seq_len is not None and (isinstance(max_seq_len, bool)
                                    or not isinstance(max_seq_len, int) or max_seq_len < 0):
        raise ValueError(f"max_seq_len: expected a non-negative int or None, got {max_seq_len!r}")
    check_num_q_heads(num_q_heads, h)
    backend = _pick_backend(backend, k, "k")
    if cu_seqlens is not None:
        if seq_lens is not None:
            raise ValueError("cu_seqlens: expected either seq_lens or cu_seqlens, got both")
        cu = _check_cu_seqlens(cu_seqlens, b, t)
        lens = np.diff(cu)
        cache = QuantizedKVCache.empty(
            len(lens), h, d, dt, config, backend=backend,
            device=str(k.device) if backend == "numba" else None,
            max_seq_len=max(max_seq_len or 0, int(lens.max(initial=0)))
            if backend == "numba" else None,
            num_q_heads=num_q_heads)
        if backend == "reference":
            cache._store.adopt_container("k", k)
        for row, n in enumerate(lens):
            if n:
                s = int(cu[row])
                cache.fill_row(row, k[:, :, s : s + int(n)], v[:, :, s : s + int(n)])
        if backend == "numba":
            _numba_backend().check_prefill(cache._store)
        return cache
    if seq_lens is not None:
        lens = check_seq_lens(seq_lens, b, t)
        if (lens == t).all():
            seq_lens = None  # no padding: the batched path
        else:
            cache = QuantizedKVCache.empty(
                b, h, d, dt, config, backend=backend,
                device=str(k.device) if backend == "numba" else None,
                max_seq_len=max(max_seq_len or 0, t) if backend == "numba" else None,
                num_q_heads=num_q_heads)
            if backend == "reference":
                cache._store.adopt_container("k", k)
            for row in range(b):
                n = int(lens[row])
                if n:
                    cache.fill_row(row, k[row : row + 1, :, :n], v[row : row + 1, :, :n])
            if backend == "numba":
                _numba_backend().check_prefill(cache._store)
            return cache
    if backend == "numba":
        return _numba_backend().quantize_kv(k, v, config, max_seq_len, num_q_heads)
    cache = QuantizedKVCache.empty(b, h, d, dt, config)
    if t:
        cache._store.append(k, v)  # validated above; errors name k and v (append: k_new, v_new)
    else:  # no tokens yet: the inputs' container is still the cache's (see append)
        cache._store.adopt_container("k", k)
    return cache


def torch_device(cache):
    import torch

    return torch.device(cache.device)


def _torch_bool():
    import torch

    return torch.bool


def _check_cu_seqlens(cu_seqlens, batch: int, total: int) -> np.ndarray:
    """``cu_seqlens`` as int64 NumPy ``[rows + 1]``; ValueError/TypeError naming it."""
    if V.is_torch(cu_seqlens):
        cu_seqlens = cu_seqlens.detach().cpu().numpy()
    cu = np.asarray(cu_seqlens)
    if cu.dtype.kind not in "iu":
        raise TypeError(f"cu_seqlens: expected integers, got dtype {cu.dtype}")
    if batch != 1:
        raise ValueError(f"k: expected [1, num_kv_heads, total_tokens, head_dim] with "
                         f"cu_seqlens (the prompts one after the other), got batch {batch}")
    cu = cu.astype(np.int64)
    if (cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] != total
            or (np.diff(cu) < 0).any()):
        raise ValueError(f"cu_seqlens: expected [0, ..., {total}] (non-decreasing, 1-D, at least "
                         f"one row), got {cu.tolist() if cu.size <= 16 else cu.shape}")
    return cu


def check_seq_lens(seq_lens, batch: int, seq_len: int) -> np.ndarray:
    """``seq_lens`` as int64 NumPy ``[batch]`` in ``[0, seq_len]``; ValueError/TypeError."""
    if V.is_torch(seq_lens):
        seq_lens = seq_lens.detach().cpu().numpy()
    lens = np.asarray(seq_lens)
    if lens.dtype.kind not in "iu":
        raise TypeError(f"seq_lens: expected integers, got dtype {lens.dtype}")
    if lens.shape != (batch,):
        raise ValueError(f"seq_lens: expected shape [batch] = [{batch}], got {lens.shape}")
    lens = lens.astype(np.int64)
    if lens.min() < 0 or lens.max() > seq_len:
        raise ValueError(f"seq_lens: expected values in [0, seq_len = {seq_len}], got "
                         f"{lens.tolist()}")
    return lens


def check_num_q_heads(num_q_heads, num_kv_heads) -> None:
    """``num_q_heads``: None or a positive multiple of ``num_kv_heads`` (GQA)."""
    if num_q_heads is None:
        return
    if (isinstance(num_q_heads, bool) or not isinstance(num_q_heads, (int, np.integer))
            or num_q_heads <= 0 or num_q_heads % num_kv_heads):
        raise ValueError(f"num_q_heads: expected None or a positive multiple of num_kv_heads "
                         f"({num_kv_heads}), got {num_q_heads!r}")


def _check_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float, got {scale}")
    return float(scale)


def check_query(q, cache: QuantizedKVCache):
    """Validate ``q [batch, num_q_heads, q_len, head_dim]`` against a cache; returns q's dtype."""
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache: expected QuantizedKVCache, got {type(cache).__name__}")
    # a decode loop passes queries of one kind every step: the checks below depend only on
    # (type, shape, dtype) and the cache's batch, so a torch query of a kind that passed them
    # on this cache skips them (about 2 us of a few-us host step)
    sig = (type(q), q.shape, q.dtype, cache.batch) if V.is_torch(q) else None
    memo = getattr(cache, "_q_checked", None)
    if sig is not None and memo is not None and memo[0] == sig:
        dt, q_len = memo[1], sig[1][2]
    else:
        shape = V.check_rank4("q", q, "batch, num_q_heads, q_len, head_dim")
        dt = V.check_float_dtype("q", q)
        b, hq, q_len, d = shape
        if b != cache.batch or d != cache.head_dim:
            raise ValueError(f"q: expected shape [{cache.batch}, num_q_heads, q_len, "
                             f"{cache.head_dim}] to match the cache, got {shape}")
        if hq % cache.num_kv_heads:
            raise ValueError(f"q: num_q_heads ({hq}) must be a multiple of the cache's "
                             f"num_kv_heads ({cache.num_kv_heads})")
        if sig is not None:
            cache._q_checked = (sig, dt)
    lens = cache._store.known_lengths()
    if lens is None:  # prepared for capture: the lengths live on the device (not checked here)
        return dt
    ls = lens.tolist()  # a few rows: Python's min/max cost less than two NumPy reductions
    lo, hi = min(ls), max(ls)
    if hi == 0:
        raise ValueError("cache: expected at least one token, got an empty cache")
    # empty rows (reset, not refilled yet) are allowed: their output is zeros
    shortest = hi if lo == hi else min(n for n in ls if n > 0)
    if not 1 <= q_len <= shortest:
        what = (f"cache.seq_len ({shortest})" if (lens == shortest).all() else
                f"the shortest non-empty row's seq_len ({shortest})")
        raise ValueError(f"q: expected 1 <= q_len <= {what} (the queries are the last q_len "
                         f"tokens of each row), got q_len={q_len}")
    return dt


def _check_start(start, cache: QuantizedKVCache, q_len: int):
    """``start`` as an int64 NumPy ``[batch]`` (None stays None); ValueError/TypeError if bad."""
    if start is None:
        return None
    if V.is_torch(start) and start.is_cuda:
        if cache.backend != "numba" or start.device != torch_device(cache):
            raise ValueError(f"start: a CUDA tensor needs a CUDA cache on its device, got one on "
                             f"{start.device} for a {cache.backend} cache on {cache.device}")
        if start.dtype.is_floating_point or start.dtype.is_complex or start.dtype == _torch_bool():
            raise TypeError(f"start: expected an integer dtype, got {start.dtype}")
        if tuple(start.shape) != (cache.batch,):
            raise ValueError(f"start: expected shape [batch] = [{cache.batch}], got "
                             f"{tuple(start.shape)}")
        return start  # on the device, as it is (capturable): its values are not checked
    if V.is_torch(start):
        start = start.detach().cpu().numpy()
    if isinstance(start, (list, tuple)):
        start = np.asarray(start)
    if not isinstance(start, np.ndarray):
        raise TypeError(f"start: expected an int array/tensor [batch] or None, got "
                        f"{type(start).__name__}")
    if start.dtype.kind not in "iu":
        raise TypeError(f"start: expected an integer dtype, got {start.dtype}")
    if start.shape != (cache.batch,):
        raise ValueError(f"start: expected shape [batch] = [{cache.batch}], got {start.shape}")
    start = start.astype(np.int64)
    # the first query's position: every query must see a token (an empty row: start 0)
    lens = cache._store.known_lengths()
    if lens is None:  # lengths on the device (prepare_capture): only the sign is checked here
        lens = np.full(cache.batch, np.iinfo(np.int32).max, np.int64)
    hi = np.maximum(lens - q_len, 0)
    bad = (start < 0) | (start > hi)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"start: expected 0 <= start[b] <= seq_len - q_len = {int(hi[b])} "
                         f"(every query must see at least one token), got start[{b}] = "
                         f"{int(start[b])}")
    return start


def decode_attention(q, cache: QuantizedKVCache, scale: float | None = None,
                     return_lse: bool = False, *, start=None):
    """Attention of ``q [batch, num_q_heads, q_len, head_dim]`` over a quantized cache.

    Query head h reads KV head ``h // (num_q_heads // num_kv_heads)`` (GQA). With q_len > 1 the
    queries are the last q_len tokens of the cache and attend causally. Equivalent to exact
    softmax attention over :func:`dequantize_kv` of the cache.

    ``start`` (optional, int ``[batch]``, NumPy array, list or torch tensor): row b attends only
    tokens ``start[b] .. `` (the first valid token of a left-padded row, or the first key of a
    sliding window for one query); ``0 <= start[b] <= seq_len[b] - q_len``; all zeros is the
    same as None. Both backends take it; the CUDA kernels read it from the cache's device
    lengths (whole key groups before it are skipped). On a CUDA cache a CUDA integer tensor is
    copied on the device as it is (capturable in a CUDA graph; its values are not checked: a
    row whose start passes its last token gets zeros); host values are checked.

    Rows may have different lengths (:attr:`QuantizedKVCache.seq_lens`): each row's queries are
    its last q_len tokens; an empty row (after :meth:`QuantizedKVCache.reset_rows`) returns
    zeros and lse -inf. ``q_len`` must not exceed the shortest non-empty row.

    Returns ``out [batch, num_q_heads, q_len, head_dim]`` in q's dtype and container, and with
    ``return_lse=True`` also the float32 natural-log log-sum-exp ``[batch, num_q_heads, q_len]``.
    """
    dt = check_query(q, cache)
    scale = _check_scale(scale, cache.head_dim)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    start = _check_start(start, cache, int(q.shape[2]))
    if isinstance(start, np.ndarray) and not start.any():
        start = None
    if cache.backend == "numba":
        return _numba_backend().decode_attention(q, cache, scale, return_lse, start)
    if V.is_torch(q) and q.is_cuda:
        raise ValueError(f"q: expected a host array for a reference-backend cache, got a "
                         f"tensor on {q.device}")
    q32 = V.to_numpy_f32(q)
    V.check_finite("q", q32)
    k_res, v_res = cache.residual()
    lens = cache.seq_lens
    out, lse = _ref_decode_attention(q32, cache.packed(), k_res, v_res, cache.config, scale,
                                     return_lse=True, start=start,
                                     seq_lens=None if (lens == lens[0]).all() else lens)
    out = _like(q, out, dt)
    return (out, _like(q, lse, "float32")) if return_lse else out


def dequantize_kv(cache: QuantizedKVCache, dtype: str | None = None):
    """The cache's keys and values back as ``[batch, num_kv_heads, seq_len, head_dim]``.

    Quantized tokens are dequantized, un-scaled and un-rotated; residual tokens are returned as
    stored. The result lives where the cache lives (NumPy for NumPy-built caches, torch for
    torch-built ones) and has the cache's dtype, or ``dtype`` (``"float16"``, ``"bfloat16"`` or
    ``"float32"``; NumPy returns bfloat16 as float32) when given.

    Raises ValueError when a dequantized value does not fit the output dtype (a float16 cache
    of keys near the float16 limit 65504 can dequantize beyond it: quantization error); pass
    ``dtype="float32"`` for such a cache. Checking this synchronizes a CUDA cache once.
    """
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache: expected QuantizedKVCache, got {type(cache).__name__}")
    if dtype is not None and dtype not in V.FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {V.FLOAT_DTYPES} or None, got {dtype!r}")
    out_dtype = cache.dtype if dtype is None else dtype
    lens = cache.seq_lens
    if (lens != lens[0]).any():
        raise ValueError(f"cache: dequantize_kv needs rows of one length, got seq_lens "
                         f"{lens.tolist()}; take rows alone with cache.copy().select_batch([b])")
    if cache.backend == "numba":
        k_out, v_out = _numba_backend().dequantize_kv(cache, out_dtype)
    else:
        k_hat, v_hat = dequantize_reference(cache._store)
        like = "torch" if getattr(cache._store, "torch_inputs", False) else None
        with np.errstate(over="ignore"):  # overflow is reported below, not as a warning
            k_out = _to_output(k_hat, out_dtype, like)
            v_out = _to_output(v_hat, out_dtype, like)
    if out_dtype == "float16":
        _check_fits("k", k_out, dtype)
        _check_fits("v", v_out, dtype)
    return k_out, v_out


def _check_fits(name, out, dtype):
    """ValueError if a float16 output of finite cache contents holds inf (overflow)."""
    if V.is_torch(out):
        import torch

        over = bool(torch.isinf(out).any())
    else:
        over = bool(np.isinf(out).any())
    if over:
        given = "the cache's dtype float16" if dtype is None else "dtype='float16'"
        raise ValueError(
            f"dtype: the dequantized {name} exceeds the float16 range (|x| <= 65504) of "
            f"{given} (quantization error near the limit); use dequantize_kv(cache, "
            "dtype='float32')")


def _to_output(x64, dtype, like):
    if like == "torch":
        import torch

        return torch.from_numpy(np.asarray(x64, np.float32)).to(getattr(torch, dtype))
    np_dt = {"float16": np.float16, "float32": np.float32, "bfloat16": np.float32}[dtype]
    return np.asarray(x64).astype(np_dt)


def _like(ref, x, dtype):
    """Return ``x`` (NumPy) in ref's container: torch tensor of dtype, or NumPy array."""
    if V.is_torch(ref):
        return _to_output(x, dtype, "torch")
    if dtype == "bfloat16":
        dtype = "float32"
    return np.asarray(x).astype(dtype)
