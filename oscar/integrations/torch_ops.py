"""oscar's append and decode as ``torch.library`` custom ops, for ``torch.compile`` (issue 25).

A compiled decode function (``torch.compile(fn, mode="reduce-overhead")``, CUDA graphs) must not
break its graph at oscar's calls, and must see what they touch. So:

* ``torch.ops.oscar.append(k_new, v_new, lengths, cache_id)`` appends to the cache and declares
  that it mutates ``lengths`` (the cache's per-row lengths: on CUDA the device int32
  ``[batch, 4]`` array the kernels read and the append kernel advances; on the reference backend
  a CPU mirror of them). The mutation orders it before the decode, which reads ``lengths``.
* ``torch.ops.oscar.decode_attention(q, lengths, cache_id, scale) -> out``: a fresh
  ``[batch, num_q_heads, q_len, head_dim]`` tensor in q's dtype.

Their fake implementations only allocate (``empty_like``), so the compiler traces them without
running kernels. The cache itself is not a tensor: ops take its integer id from
:func:`register` (a weak registry; :func:`append` and :func:`decode_attention` register as needed).
The packed buffers and the residual window are reached through the cache, outside the compiler's
view: a capturable loop therefore needs :meth:`oscar.QuantizedKVCache.prepare_capture` (capacity
reserved, no reallocation, lengths on the device), which also marks ``lengths`` as a static
address for CUDA graphs. ``torch.library.opcheck`` checks both ops (tests/test_torch_ops.py on
the CPU reference backend; tests/test_graph_step.py on CUDA).
"""

from __future__ import annotations

import itertools
import weakref

import numpy as np
import torch

from .. import api
from ..cache import QuantizedKVCache

_CACHES: "weakref.WeakValueDictionary[int, QuantizedKVCache]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


def register(cache: QuantizedKVCache) -> int:
    """The cache's id for the ops (assigned once; the registry holds the cache weakly)."""
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache: expected QuantizedKVCache, got {type(cache).__name__}")
    cid = getattr(cache, "_op_id", None)
    if cid is None or _CACHES.get(cid) is not cache:
        cid = next(_IDS)
        cache._op_id = cid
        _CACHES[cid] = cache
    return cid


def lengths_tensor(cache: QuantizedKVCache) -> torch.Tensor:
    """The tensor the ops declare for the cache's lengths: the device lengths array on CUDA, a
    CPU int32 ``[batch, 4]`` mirror (start 0, packed, residual, 0) on the reference backend."""
    store = cache._store
    if cache.backend == "numba":
        return store.lengths
    t = getattr(cache, "_op_lengths", None)
    if t is None or t.shape[0] != cache.batch:
        t = cache._op_lengths = torch.zeros((cache.batch, 4), dtype=torch.int32)
        _mirror(cache, t)
    return t


def _mirror(cache, t: torch.Tensor) -> None:
    r = cache.config.residual_length
    lens = cache.seq_lens
    host = np.zeros((cache.batch, 4), np.int32)
    host[:, 1], host[:, 2] = lens // r * r, lens % r
    t.copy_(torch.from_numpy(host))


def _cache(cache_id: int) -> QuantizedKVCache:
    cache = _CACHES.get(int(cache_id))
    if cache is None:
        raise ValueError(f"cache_id: no live cache has id {cache_id} (register it first)")
    return cache


@torch.library.custom_op("oscar::append", mutates_args=("lengths",))
def _append_op(k_new: torch.Tensor, v_new: torch.Tensor, lengths: torch.Tensor,
               cache_id: int) -> None:
    cache = _cache(cache_id)
    cache.append(k_new, v_new)
    if cache.backend != "numba":  # the device array is advanced by the append kernel itself
        _mirror(cache, lengths)


@_append_op.register_fake
def _append_fake(k_new, v_new, lengths, cache_id) -> None:
    return None


@torch.library.custom_op("oscar::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, lengths: torch.Tensor, cache_id: int,
               scale: float) -> torch.Tensor:
    return api.decode_attention(q, _cache(cache_id), scale=scale)


@_decode_op.register_fake
def _decode_fake(q, lengths, cache_id, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def prepare(cache: QuantizedKVCache) -> QuantizedKVCache:
    """Register the cache for the ops and build its lengths tensor, eagerly: call it before a
    compiled function first runs (registering inside a trace is not traceable); on CUDA also
    marks the lengths as a static address (:func:`mark_static`). Returns the cache."""
    register(cache)
    lengths_tensor(cache)
    if cache.backend == "numba":
        mark_static(cache)
    return cache


def _handles(cache):
    cid = getattr(cache, "_op_id", None)
    if cid is None or getattr(cache, "_op_lengths", None) is None and cache.backend != "numba":
        if torch.compiler.is_compiling():
            raise ValueError("cache: call oscar.integrations.torch_ops.prepare(cache) before "
                             "compiling a function that uses it")
        prepare(cache)
        cid = cache._op_id
    return lengths_tensor(cache), cid


def append(cache: QuantizedKVCache, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """:meth:`QuantizedKVCache.append` through the custom op (traceable by torch.compile)."""
    lengths, cid = _handles(cache)
    torch.ops.oscar.append(k_new, v_new, lengths, cid)


def decode_attention(q: torch.Tensor, cache: QuantizedKVCache, scale: float | None = None):
    """:func:`oscar.decode_attention` through the custom op (traceable by torch.compile)."""
    if scale is None:
        scale = 1.0 / float(cache.head_dim) ** 0.5
    lengths, cid = _handles(cache)
    return torch.ops.oscar.decode_attention(q, lengths, cid, float(scale))


def mark_static(cache: QuantizedKVCache) -> None:
    """Mark the cache's lengths tensor as a static address for CUDA graphs under torch.compile
    (its storage never moves: the capture of a mutated input is then allowed)."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
    if mark is not None:
        mark(lengths_tensor(cache))
