"""The GPU runtime: warm-up and the persistent kernel cache (CUDA backend).

    oscar.warmup(num_kv_heads=8, head_dim=128, num_q_heads=32, dtype="bfloat16")
    oscar.runtime.kernel_cache_info()    # where the compiled kernels are, how many, this process's hits
    oscar.runtime.clear_kernel_cache()

Kernels are compiled for the configuration and shapes they serve (bits, groups, head_dim, query
rows per KV head, dtypes). The first process on a machine compiles each one (seconds); the
compiled kernel is stored in the kernel cache directory (``oscar.kernels_numba.kernel_cache``:
``$OSCAR_CACHE_DIR``, else ``$XDG_CACHE_HOME/oscar/kernels``, else ``~/.cache/oscar/kernels``) and
later processes load it in milliseconds. :func:`warmup` does this ahead of time for a set of
shapes; creating a cache (:func:`oscar.quantize_kv`, ``QuantizedKVCache.empty(backend="numba")``)
does it for the kernels its decode loop launches, so that no step of a decode loop compiles.
"""

from __future__ import annotations

import time

from .config import OScaRConfig


def _kc():
    from .kernels_numba import kernel_cache

    return kernel_cache


def warmup(config: OScaRConfig | None = None, *, num_kv_heads: int, head_dim: int,
           num_q_heads: int | None = None, dtype: str = "bfloat16", batch_sizes=(1,),
           q_lens=(1,), device="cuda") -> dict:
    """Compile or load every kernel that caches of these shapes use, before the first call.

    Args:
        config: the cache configuration (default ``OScaRConfig()``).
        num_kv_heads, head_dim: the model's KV heads per layer and head size.
        num_q_heads: query heads (GQA); without it only the quantize kernels are prepared.
        dtype: the K/V (and query) dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        batch_sizes: batch sizes the caches will have (the flush kernel depends on it).
        q_lens: query tokens per decode step (1: plain decode; more for speculative steps).
        device: the CUDA device.

    Kernels that are compiled (not loaded) print one progress line each on stderr when they take
    more than a second. Returns ``{"kernels": n, "compiled": n, "loaded": n, "seconds": s}``.
    """
    from .cache import QuantizedKVCache

    config = OScaRConfig() if config is None else config
    if not isinstance(config, OScaRConfig):
        raise TypeError(f"config: expected OScaRConfig, got {type(config).__name__}")
    for name, val in (("batch_sizes", batch_sizes), ("q_lens", q_lens)):
        if (not isinstance(val, (tuple, list)) or not val
                or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in val)):
            raise ValueError(f"{name}: expected a non-empty tuple of positive ints, got {val!r}")
    try:
        import torch
    except ImportError as exc:
        raise ImportError("oscar.warmup prepares the CUDA kernels: it needs torch with CUDA "
                          "and the numba extra (pip install 'oscar-kv[numba,torch]')") from exc
    if not torch.cuda.is_available():
        raise ValueError("device: oscar.warmup prepares CUDA kernels, but torch sees no CUDA "
                         "device (the NumPy reference backend needs no warm-up)")
    kc = _kc()
    before = dict(kc.stats)
    t0 = time.perf_counter()
    from . import _cuda_bridge as bridge
    from .kernels_numba import quantize as _quant

    for batch in batch_sizes:
        cache = QuantizedKVCache.empty(batch, num_kv_heads, head_dim, dtype, config,
                                       backend="numba", device=device)
        store = cache._store
        with bridge._Launch(store.device):
            _quant.quantize_kernels(config, head_dim, dtype, num_kv_heads, batch, prefill=True)
        store.warm(num_q_heads, tuple(q_lens))
    compiled = kc.stats["misses"] - before["misses"]
    loaded = kc.stats["hits"] - before["hits"]
    return {"kernels": compiled + loaded, "compiled": compiled, "loaded": loaded,
            "seconds": time.perf_counter() - t0}


def kernel_cache_info() -> dict:
    """The kernel cache directory, whether it is used, its entries and bytes, and this process's
    counters (hits, misses, corrupt entries discarded, seconds compiling and loading)."""
    return _kc().info()


def clear_kernel_cache() -> int:
    """Delete the compiled kernels of the cache directory; returns how many were removed."""
    return _kc().clear()
