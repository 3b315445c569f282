"""Hugging Face transformers 5.x: ``generate()`` on a packed OScaR cache, no model-file fork.

    from oscar.integrations.transformers import OScaRCache   # registers "oscar" on import
    model.set_attn_implementation("oscar")
    out = model.generate(**inputs, past_key_values=OScaRCache(model.config, oscar.OScaRConfig()))

How it plugs in (public transformers interfaces only: ``Cache``, ``CacheLayerMixin``,
``AttentionInterface``, ``AttentionMaskInterface``, ``sdpa_mask``, ``sdpa_attention_forward``):

* ``OScaRCache`` is a ``Cache`` of one :class:`OScaRLayer` per quantized layer (a plain
  ``DynamicLayer`` where the per-layer configuration is ``None``). ``OScaRLayer.update()`` only
  records the new K/V and returns the layer itself; Llama, Qwen2, Qwen3 and Mistral hand that
  result untouched to the registered attention function, so the history is never dequantized.
* The ``"oscar"`` mask function returns an :class:`OScaRMask`: the arguments transformers gave
  it, the dense boolean mask that ``attn_implementation="sdpa"`` would get (built on demand by
  transformers' own ``sdpa_mask``), and the per-row structure the packed path needs.
* The ``"oscar"`` attention function then runs, per layer:

  - **prefill** (empty layer): exact SDPA over the prompt's own K/V with the SDPA mask (the same
    call as ``attn_implementation="sdpa"``), then quantizes the prompt (``oscar.quantize_kv``);
    left-padded positions are first overwritten by a copy of the row's first valid token, so
    they never widen a key group's range (keys: per channel over 32-token groups; norms and
    values per token);
  - **decode** (q_len >= 1 over a non-empty layer: plain decoding, chunked-prefill
    continuation, assisted/speculative verification): append, then ``oscar.decode_attention``
    on the packed cache, with a per-row first visible token (``start``) for left padding and,
    with one query, for a sliding window; used when the mask is "causal from a per-row start"
    and the decode kernels take the query block (``MAX_DECODE_ROWS`` rows per KV head on the
    reference backend, at most ``MAX_HEAD_GROUPS`` launches on CUDA);
  - **chunk path** (larger query blocks, or masks with a different start per query, e.g. a
    sliding window with several queries): dequantize the history once for this chunk
    (``oscar.dequantize_kv``) and run exact SDPA over it with the dense mask.

CUDA: the decode kernels take the per-row start (issue 25: it travels in the cache's device
lengths array), so left-padded batches and windows with one query run on the packed path there
too. docs/integrations.md has the details, the limits and the file format of
:meth:`OScaRCache.save`.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np

try:
    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("oscar.integrations.transformers needs torch and transformers 5.x: "
                      f"pip install 'oscar-kv[transformers]' ({exc})") from exc

from .. import _serialize
from ..api import decode_attention, dequantize_kv, quantize_kv
from ..config import OScaRConfig

if int(transformers.__version__.split(".")[0]) != 5:  # pragma: no cover
    raise ImportError(f"oscar.integrations.transformers needs transformers 5.x, got "
                      f"{transformers.__version__}")

#: The name registered in transformers' AttentionInterface and AttentionMaskInterface.
ATTN_IMPLEMENTATION = "oscar"
#: Model families whose attention hands ``Cache.update()``'s result untouched to the registered
#: attention function (checked in their transformers 5.x sources) and that the tests cover.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
#: Query rows per KV head (``num_q_heads / num_kv_heads * q_len``) up to which a step on the
#: reference backend runs ``decode_attention`` on the packed cache; larger blocks take the chunk
#: path (dequantize once, exact SDPA), so that CPU tests exercise both paths.
MAX_DECODE_ROWS = 16
#: On CUDA a step runs on the packed cache when the decode kernels take it in at most this many
#: launches over groups of query heads (``kernels_numba.attention.head_groups``: one launch up to
#: 256 rows per KV head at head_dim 128 on the v3 kernel's row blocks, 32 on v1; each further
#: launch reads the packed history again);
#: beyond, the chunk path's one dequantization is the cheaper read.
MAX_HEAD_GROUPS = 4
#: attention-function keyword arguments that change the attention math in ways the packed path
#: does not implement (logit soft-capping, attention sinks, additive position biases).
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")



# --- the mask ---------------------------------------------------------------------------------
class OScaRMask:
    """What the ``"oscar"`` mask function hands the attention function.

    Holds transformers' mask arguments; :meth:`dense` is exactly the mask that
    ``attn_implementation="sdpa"`` gets (None where SDPA may use ``is_causal``);
    :meth:`padding` the per-row first valid token of the 2-D padding mask; :meth:`row_start`
    the per-row first visible key if the mask is "causal from a per-row start" (what
    ``decode_attention(start=...)`` expresses). Shared by all layers of one type in a forward,
    so each is computed once.
    """

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs
        self.attention_mask = kwargs.get("attention_mask")
        self.q_length = int(kwargs["q_length"])
        self.kv_length = int(kwargs["kv_length"])
        self.kv_offset = int(kwargs.get("kv_offset", 0) or 0)
        self.window = kwargs.get("local_size")
        self._dense = self._full = self._pad = None
        self._have = set()
        self._starts: dict = {}
        self._device_starts: dict = {}

    def dense(self, materialize: bool = False):
        """Boolean ``[B or 1, 1, q_len, kv_len]`` (True = attend) or None (plain causal; only
        when ``materialize`` is False)."""
        if materialize:
            if "full" not in self._have:
                self._full = self.dense() if self.dense() is not None else sdpa_mask(
                    **{**self.kwargs, "allow_is_causal_skip": False})
                self._have.add("full")
            return self._full
        if "dense" not in self._have:
            self._dense = sdpa_mask(**self.kwargs)
            self._have.add("dense")
        return self._dense

    def padding(self):
        """int64 ``[B]``: the first valid (unpadded) position of each row, or None without
        padding. ValueError unless every row is left padding (zeros, then ones)."""
        if "pad" in self._have:
            return self._pad
        am = self.attention_mask
        pad = None
        if am is not None:
            if not isinstance(am, torch.Tensor) or am.ndim != 2:
                raise ValueError(f"attention_mask: expected a 2-D padding mask [batch, seq_len], "
                                 f"got {type(am).__name__} {tuple(getattr(am, 'shape', ()))}")
            am = am.to(torch.bool).cpu()
            if am.shape[1] > 1 and bool((am[:, 1:].int() < am[:, :-1].int()).any()):
                raise ValueError("attention_mask: OScaRCache supports left padding only (each "
                                 "row: zeros, then ones); got right padding or a gap")
            # a row with no valid token yet (a prefill chunk inside its padding) gets the mask's
            # length: _fill_padding then raises for the tokens it cannot fill
            p = (~am).sum(dim=1).numpy().astype(np.int64)
            pad = p if p.any() else None
        self._pad = pad
        self._have.add("pad")
        return pad

    def row_start(self, q_len: int, seq_len: int):
        """``(ok, start)``: ok if query i of row b sees exactly tokens ``start[b] ..
        seq_len - q_len + i`` (start: int64 ``[B]``, None for all zeros)."""
        key = (q_len, seq_len)
        if key in self._starts:
            return self._starts[key]
        d = self.dense()
        if d is None:
            res = (True, None)  # SDPA may use is_causal: plain causal, no padding
        elif d.shape[-1] != seq_len or d.shape[-2] != q_len:
            res = (False, None)
        else:
            d = d[:, 0].cpu()  # [B or 1, q_len, seq_len]
            first = d[:, 0, :].to(torch.int8).argmax(dim=-1)  # first visible key of query 0
            j = torch.arange(seq_len)
            last = seq_len - q_len + torch.arange(q_len)
            want = (j[None, None, :] >= first[:, None, None]) & (j[None, None, :]
                                                                 <= last[None, :, None])
            ok = bool(d[:, 0, :].any(dim=-1).all()) and torch.equal(d, want)
            start = first.numpy().astype(np.int64)
            res = (ok, start if ok and start.any() else None)
        self._starts[key] = res
        return res

    def device_start(self, start: np.ndarray, device):
        """``start`` (a host array from :meth:`row_start`) as an int32 tensor on ``device``, once
        per mask and device: every layer of a forward shares one host-to-device copy (the
        decode kernels read it from the device; ``row_start`` has checked its values)."""
        key = (id(start), str(device))
        t = self._device_starts.get(key)
        if t is None:
            t = torch.from_numpy(start.astype(np.int32)).to(device)
            self._device_starts[key] = t
        return t


def oscar_mask(**kwargs):
    """The ``"oscar"`` entry of transformers' AttentionMaskInterface: an :class:`OScaRMask`."""
    return OScaRMask(kwargs)


# --- one layer --------------------------------------------------------------------------------
class OScaRLayer(CacheLayerMixin):
    """One quantized attention layer: an :class:`oscar.QuantizedKVCache` plus the per-row first
    valid token of a left-padded batch. ``update()`` returns the layer itself (a handle); the
    ``"oscar"`` attention function does the rest (:meth:`attend`)."""

    is_compileable = False
    is_croppable = True  # inside the residual window; beyond it crop raises
    is_sliding = False  # keeps every token: windows are applied by the mask (module docstring)

    def __init__(self, config: OScaRConfig, layer_idx: int, max_cache_len: int | None = None,
                 num_kv_heads: int | None = None, decode_q_lens=(1,)):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.max_cache_len = max_cache_len
        self.decode_q_lens = tuple(decode_q_lens)  # prepared at the prefill (CUDA)
        self.num_kv_heads = num_kv_heads  # the model's (all ranks'), for the sharding check
        self.cache = None  # oscar.QuantizedKVCache once the prompt is in
        self.pad = None  # int64 [batch] first valid token per row, None without padding
        self._pending = None  # (k, v) of the current forward, until attend() consumes them
        self._static = None  # graphable decode (begin_static): {"len": host count, "start": ...}

    def __repr__(self):
        return f"OScaRLayer({self.layer_idx}, {self.cache!r})"

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending is not None:
            raise RuntimeError(
                f"layer {self.layer_idx}: update() called twice without attention in between: "
                "the model's attention did not run through attn_implementation='oscar'")
        self.is_initialized = True
        self._pending = (key_states, value_states)
        return self, self

    def get_seq_length(self) -> int:
        if self._static is not None:  # no device read: a capture may be in progress
            n = self._static["len"]
        else:
            n = self.cache.seq_len if self.cache is not None else 0
        return n + (self._pending[0].shape[-2] if self._pending is not None else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache, self.pad, self._pending, self._static = None, None, None, None
        self.is_initialized = False

    # the graphable decode step (graphed_generate)
    def begin_static(self, max_cache_len: int, num_q_heads: int, q_dtype) -> None:
        """Switch to the graphable one-token decode: capacity for ``max_cache_len`` tokens
        reserved, lengths on the device (:meth:`oscar.QuantizedKVCache.prepare_capture`), the
        decode workspaces built, the rows' left padding uploaded once. From here on
        :meth:`attend` appends and decodes with no host read of a length and no mask: the step
        is the same every token, so it can be captured in a CUDA graph. Ends with
        :meth:`end_static`."""
        if self.cache is None:
            raise ValueError(f"layer {self.layer_idx}: begin_static needs the prompt in the "
                             "cache (run the prefill first)")
        self.cache.prepare_capture(int(max_cache_len), num_q_heads=int(num_q_heads),
                                   q_lens=(1,), q_dtype=q_dtype)
        start = self.pad
        if start is not None and self.cache.backend == "numba":
            start = torch.from_numpy(start.astype(np.int32)).to(self.cache.device)
        self._static = {"len": int(self.cache.seq_lens.max(initial=0)), "start": start}

    def end_static(self) -> None:
        """Leave the graphable decode: the lengths are read back from the device."""
        if self._static is not None:
            self.cache.sync_lengths()
            self._static = None

    def _attend_static(self, query, k_new, v_new, scaling):
        if query.shape[2] != 1 or k_new.shape[2] != 1:
            raise ValueError(f"layer {self.layer_idx}: the graphable decode (begin_static) takes "
                             f"one token per step, got q_len {query.shape[2]}")
        self.cache.append(k_new, v_new)
        self._static["len"] += 1
        out = decode_attention(query, self.cache, scale=scaling, start=self._static["start"])
        return out.transpose(1, 2).contiguous()

    # batch edits: one gather on the packed arrays, the residual and the padding together
    def batch_select_indices(self, indices) -> None:
        if self.cache is None:
            return
        idx = torch.as_tensor(indices).detach().cpu()
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.numpy().astype(np.int64)
        self.cache.select_batch(idx)
        if self.pad is not None:
            self.pad = self.pad[idx]

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cache is not None:
            self.batch_select_indices(np.repeat(np.arange(self.cache.batch), repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: remove that many tokens; positive: keep that many (older transformers).
        An int or a 0-d tensor (transformers 5.17's assisted decoding passes one)."""
        tokens_to_remove = int(tokens_to_remove)
        if self.cache is None or tokens_to_remove == 0:
            return
        n = self.cache.seq_len
        keep = n + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, n)
        try:
            self.cache.truncate(max(keep, 0))
        except ValueError as exc:
            raise ValueError(f"layer {self.layer_idx}: cannot crop {n} tokens to {keep}: "
                             f"{exc}") from None

    # the attention of one forward
    def attend(self, module, query, mask, scaling, kwargs):
        k_new, v_new = self._pending
        self._pending = None
        i = self.layer_idx
        if self._static is not None:  # the mask is not read: padding and positions are fixed
            return self._attend_static(query, k_new, v_new, scaling)
        if mask is not None and not isinstance(mask, OScaRMask):
            raise ValueError(f"layer {i}: expected the mask built by the 'oscar' mask function, "
                             f"got {type(mask).__name__} (custom 4-D masks are not supported "
                             "by OScaRCache)")
        pad = mask.padding() if mask is not None else None
        if self.cache is None:  # prefill: exact attention over the prompt, then quantize
            _check_sharding(i, int(k_new.shape[1]), self.num_kv_heads, self.config)
            out, _ = sdpa_attention_forward(module, query, k_new, v_new,
                                            mask.dense() if mask is not None else None,
                                            dropout=0.0, scaling=scaling, **kwargs)
            k_s, v_s = _fill_padding(i, k_new, v_new, 0, pad)
            # num_q_heads: the decode kernels are loaded (or compiled) now, not in the loop;
            # max_seq_len: packed storage reserved up front (no reallocation while decoding)
            self.cache = quantize_kv(k_s, v_s, self.config, max_seq_len=self.max_cache_len,
                                     num_q_heads=int(query.shape[1]))
            self.pad = pad
            self._prepare_q_lens(int(query.shape[1]), query)
            return out
        if not _same_padding(self.pad, pad):
            raise ValueError(f"layer {i}: the attention mask's left padding {_fmt(pad)} differs "
                             f"from the one the cache was built with {_fmt(self.pad)}")
        t0 = self.cache.seq_len
        k_s, v_s = _fill_padding(i, k_new, v_new, t0, pad)
        self.cache.append(k_s, v_s)
        q_len, seq_len = int(query.shape[2]), t0 + int(k_new.shape[2])  # every row grew by n
        ok, start = mask.row_start(q_len, seq_len) if mask is not None else (True, None)
        if ok and self._packed_path(int(query.shape[1]), q_len):
            if start is not None and query.is_cuda:
                start = mask.device_start(start, query.device)
            out = decode_attention(query, self.cache, scale=scaling, start=start)
            return out.transpose(1, 2).contiguous()
        # chunk path: the history dequantized once for this chunk, exact SDPA with the mask
        k_all, v_all = dequantize_kv(self.cache)
        k_all = k_all.to(device=query.device, dtype=query.dtype)
        v_all = v_all.to(device=query.device, dtype=query.dtype)
        out, _ = sdpa_attention_forward(module, query, k_all, v_all,
                                        mask.dense(materialize=True) if mask is not None
                                        else _causal(q_len, seq_len, query.device),
                                        dropout=0.0, scaling=scaling, **kwargs)
        return out


    def _prepare_q_lens(self, num_q_heads: int, query) -> None:
        """On CUDA, compile or load the decode kernels of every q_len in ``decode_q_lens`` that
        runs on the packed cache (quantize_kv prepared q_len 1), so that a verification step of
        assisted/speculative decoding never compiles in the middle of a generation."""
        if self.cache.backend != "numba":
            return
        for q_len in self.decode_q_lens:
            if q_len > 1 and self._packed_path(num_q_heads, q_len):
                self.cache._store._warm_decode(num_q_heads, q_len,
                                               str(query.dtype).replace("torch.", ""))

    def _packed_path(self, num_q_heads: int, q_len: int) -> bool:
        """Whether a step of this query shape runs on the packed cache (MAX_DECODE_ROWS on the
        reference backend, MAX_HEAD_GROUPS launches on CUDA) or takes the chunk path."""
        if self.cache.backend == "numba":
            try:
                return self.cache._store._head_groups(num_q_heads, q_len) <= MAX_HEAD_GROUPS
            except ValueError:  # q_len alone is too many rows for the kernels
                return False
        return num_q_heads // self.cache.num_kv_heads * q_len <= MAX_DECODE_ROWS


def _check_sharding(layer_idx, heads: int, model_heads, config: OScaRConfig) -> None:
    """Tensor parallelism (transformers' ``tp_plan``) gives each rank ``num_kv_heads /
    world_size`` KV heads. The default token norm spans all KV heads of a token, so on one rank it
    would cover only that rank's heads: a different quantization than one process computes.
    ``norm_scope="head"`` (one norm per token and head) is the same on any sharding."""
    if (model_heads is not None and heads != model_heads and config.scale_tokens
            and config.norm_scope == "token"):
        raise ValueError(
            f"layer {layer_idx}: this process holds {heads} of the model's {model_heads} KV heads "
            "(tensor parallelism?); norm_scope='token' would normalize each token over these "
            "heads only, unlike a single process. Use OScaRConfig(norm_scope='head'), which "
            "keeps ranks independent (docs/integrations.md)")


def _causal(q_len, seq_len, device):
    j = torch.arange(seq_len, device=device)
    last = seq_len - q_len + torch.arange(q_len, device=device)
    return (j[None, :] <= last[:, None])[None, None]


def _fmt(pad):
    return "none" if pad is None else f"first valid tokens {pad.tolist()}"


def _same_padding(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool((a == b).all())


def _fill_padding(layer_idx, k, v, t0, pad):
    """Positions ``t0 ..`` of row b before ``pad[b]`` (left padding) become copies of the row's
    first valid token: inside every key group's range, equal norm, masked in attention."""
    if pad is None or not (pad > t0).any():
        return k, v
    n = k.shape[2]
    k, v = k.clone(), v.clone()
    for b in np.nonzero(pad > t0)[0]:
        p = int(pad[b]) - t0
        if p >= n:
            raise ValueError(
                f"layer {layer_idx}: row {b}: the {n} tokens at positions {t0}..{t0 + n - 1} are "
                f"all left padding (first valid token at {int(pad[b])}); OScaRCache needs each "
                "row's first valid token in the first prefill chunk (use a longer chunk)")
        k[b, :, :p] = k[b, :, p:p + 1]
        v[b, :, :p] = v[b, :, p:p + 1]
    return k, v


# --- the attention function -------------------------------------------------------------------
def oscar_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                    scaling: float | None = None, **kwargs):
    """The ``"oscar"`` entry of transformers' AttentionInterface.

    ``query [batch, num_q_heads, q_len, head_dim]``; ``key``/``value``: an :class:`OScaRLayer`
    (quantized layer) or dense tensors (an unquantized layer). Returns ``(out [batch, q_len,
    num_q_heads, head_dim], None)``.
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"layer {getattr(module, 'layer_idx', '?')}: attention with "
                             f"{name!r} is not supported by the 'oscar' attention")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError("the 'oscar' attention supports causal decoder attention only")
    if dropout and module.training:
        raise ValueError("the 'oscar' attention is for inference: got dropout in training mode")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    kwargs.pop("is_causal", None)
    if isinstance(key, OScaRLayer):
        return key.attend(module, query, attention_mask, float(scaling), kwargs), None
    mask = attention_mask.dense() if isinstance(attention_mask, OScaRMask) else attention_mask
    if isinstance(attention_mask, OScaRMask) and mask is None and query.shape[2] > 1 \
            and key.shape[2] > query.shape[2]:
        mask = attention_mask.dense(materialize=True)  # no is_causal slicing with a history
    return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0,
                                  scaling=scaling, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, oscar_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, oscar_mask)


# --- the cache --------------------------------------------------------------------------------
def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_layout(config):
    """``(num_layers, head_dim)`` of a supported model config; ValueError otherwise."""
    text = _text_config(config)
    model_type = getattr(text, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"OScaRCache: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (their attention hands the cache's update() "
            "result untouched to the registered attention function)")
    if not getattr(text, "is_causal", True) or getattr(text, "is_encoder_decoder", False):
        raise ValueError("OScaRCache: only causal decoder-only models are supported")
    if getattr(text, "attention_chunk_size", None) is not None:
        raise ValueError("OScaRCache: chunked attention (attention_chunk_size) is not supported")
    layer_types = getattr(text, "layer_types", None) or []
    bad = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if bad:
        raise ValueError(f"OScaRCache: layer types {bad} are not supported; supported: "
                         f"{SUPPORTED_LAYER_TYPES}")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"OScaRCache: num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return int(text.num_hidden_layers), int(head_dim)


def layer_configs(spec, num_layers: int) -> list:
    """One ``OScaRConfig`` or None per layer from: None (the default config everywhere), one
    ``OScaRConfig``, a list (None = unquantized layer), or the per-layer JSON of
    ``oscar report --model`` (a dict, or a path to it)."""
    if spec is None:
        return [OScaRConfig()] * num_layers
    if isinstance(spec, OScaRConfig):
        return [spec] * num_layers
    where = "oscar_config"
    if isinstance(spec, (str, os.PathLike, dict)):
        from ..layer_configs import load_layer_configs

        configs = load_layer_configs(spec)  # validates the file (ValueError naming it)
        if len(configs) != num_layers:
            raise ValueError(f"{where}: expected {num_layers} layers (the model's), got "
                             f"{len(configs)} in the per-layer configurations")
        return configs
    if isinstance(spec, (list, tuple)):
        if len(spec) != num_layers:
            raise ValueError(f"{where}: expected {num_layers} per-layer configurations (the "
                             f"model's layers), got {len(spec)}")
        for i, c in enumerate(spec):
            if c is not None and not isinstance(c, OScaRConfig):
                raise TypeError(f"{where}[{i}]: expected OScaRConfig or None, got "
                                f"{type(c).__name__}")
        return list(spec)
    raise TypeError(f"{where}: expected OScaRConfig, a list of them (None = unquantized), a "
                    f"per-layer JSON dict or a path, got {type(spec).__name__}")


class OScaRCache(Cache):
    """A transformers ``Cache`` whose layers hold packed OScaR K/V (module docstring).

    Args:
        config: the model's config (``model.config``): Llama, Qwen2, Qwen3, Mistral families.
        oscar_config: one :class:`oscar.OScaRConfig` for every layer (default: the paper's
            INT2), a list with one per layer (``None``: that layer stays unquantized, a plain
            ``DynamicLayer``), or the per-layer JSON written by ``oscar report --model`` (a dict
            or a path).
        max_cache_len: optional longest sequence (prompt + new tokens) the cache will hold. On
            CUDA the packed storage for it is reserved when the prompt is quantized, so no
            decode step reallocates; without it the storage doubles when a flush needs room
            (one slower step per doubling; docs/integrations.md). No effect on the host.
        decode_q_lens: the query lengths of the decode steps to prepare (CUDA): the kernels of
            each are compiled or loaded when the prompt is quantized, not at their first step
            (a first compile takes seconds). q_len 1 always is; assisted or speculative decoding
            with up to N draft tokens verifies N + 1 tokens a step, so pass e.g.
            ``tuple(range(1, N + 2))``. No effect on the host.

    The model must run ``attn_implementation="oscar"`` (``model.set_attn_implementation``).
    Beam search, ``num_return_sequences``, continuation over several ``generate()`` calls,
    ``copy.deepcopy`` and ``crop`` inside the residual window work; :meth:`save` and
    :meth:`load` write and read the packed cache (safetensors).
    """

    def __init__(self, config, oscar_config=None, max_cache_len: int | None = None,
                 decode_q_lens=(1,)):
        if max_cache_len is not None and (isinstance(max_cache_len, bool)
                                          or not isinstance(max_cache_len, int)
                                          or max_cache_len <= 0):
            raise ValueError(f"max_cache_len: expected a positive int or None, "
                             f"got {max_cache_len!r}")
        if (not isinstance(decode_q_lens, (tuple, list, range)) or not decode_q_lens
                or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0
                       for x in decode_q_lens)):
            raise ValueError(f"decode_q_lens: expected a non-empty sequence of positive ints, "
                             f"got {decode_q_lens!r}")
        num_layers, head_dim = _model_layout(config)
        configs = layer_configs(oscar_config, num_layers)
        for i, c in enumerate(configs):
            if c is not None:
                try:
                    c.check_head_dim(head_dim)
                except ValueError as exc:
                    raise ValueError(f"OScaRCache: layer {i}: {exc} (the model's "
                                     f"head_dim)") from None
        self.model_config = config
        self.layer_configs = configs
        self._max_cache_len = max_cache_len
        text = self._text = _text_config(config)  # read on every update (get_text_config is slow)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        super().__init__(layers=[OScaRLayer(c, i, max_cache_len, kv_heads, decode_q_lens)
                                 if c is not None else DynamicLayer()
                                 for i, c in enumerate(configs)])

    @property
    def max_cache_len(self) -> int | None:
        """The ``max_cache_len`` given (None: the cache grows). A property because transformers
        5.17's ``Cache`` defines it as one (read-only); 5.2x leaves it to subclasses."""
        return self._max_cache_len

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # every forward passes the first packed layer first: one check per forward (the layers
        # share the config; a config attribute read costs microseconds in transformers 5)
        first = getattr(self, "_first_packed", None)
        if first is None:
            first = self._first_packed = next(
                (i for i, x in enumerate(self.layers) if isinstance(x, OScaRLayer)), -1)
        if layer_idx == first:
            text = getattr(self, "_text", None) or _text_config(self.model_config)
            impl = getattr(text, "_attn_implementation", None)
            if impl != ATTN_IMPLEMENTATION:
                raise ValueError(
                    f"OScaRCache: the model runs attn_implementation={impl!r}; call "
                    f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) (the packed layers "
                    "are read only by the 'oscar' attention function)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def __deepcopy__(self, memo):
        memo[id(self.model_config)] = self.model_config  # share the model's config, copy data
        text = getattr(self, "_text", None)
        if text is not None:
            memo[id(text)] = text
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, copy.deepcopy(value, memo))
        return new

    # --- files ---------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write every layer (packed arrays, residual, configuration, lengths, per-row padding;
        dense layers as they are) to one safetensors file (docs/integrations.md)."""
        entries = []
        for layer in self.layers:
            if isinstance(layer, OScaRLayer):
                entries.append(None if layer.cache is None else _serialize.layer_entry(
                    layer.cache, {"pad": None if layer.pad is None else layer.pad.tolist()}))
            elif layer.is_initialized and layer.get_seq_length() > 0:
                entries.append(_serialize.dense_entry(layer.keys, layer.values))
            else:
                entries.append(None)
        configs = [None if c is None else dataclasses.asdict(c) for c in self.layer_configs]
        _serialize.save_caches(path, entries, extra={"layer_configs": configs})

    @classmethod
    def load(cls, path, config, device=None) -> "OScaRCache":
        """Read a file written by :meth:`save` for the model of ``config``; ``device``: None or
        ``"cpu"`` (reference backend) or a CUDA device. Bit-exact; a file of another format
        version, a truncated file or mismatched shapes raise ValueError."""
        layers, extra = _serialize.load_caches(path, device)
        stored = extra.get("layer_configs")
        if not isinstance(stored, list) or len(stored) != len(layers):
            raise ValueError(f"{path}: expected one configuration per layer in the header")
        configs = [None if c is None else OScaRConfig(**c) for c in stored]
        num_layers, _ = _model_layout(config)
        if num_layers != len(configs):
            raise ValueError(f"{path}: the file holds {len(configs)} layers, the model has "
                             f"{num_layers}")
        cache = cls(config, configs)
        dev = torch.device("cpu" if device is None else device)
        for i, (layer, data) in enumerate(zip(cache.layers, layers)):
            if data is None:
                continue
            if isinstance(layer, OScaRLayer):
                if not hasattr(data, "packed") or data.config != configs[i]:
                    raise ValueError(f"{path}: layer {i}: expected a quantized layer with the "
                                     "header's configuration")
                layer.cache = data
                pad = extra["layer_extra"][i].get("pad")
                layer.pad = None if pad is None else np.asarray(pad, np.int64)
                if layer.pad is not None and layer.pad.shape != (data.batch,):
                    raise ValueError(f"{path}: layer {i}: padding of {layer.pad.shape} rows for "
                                     f"a batch of {data.batch}")
                layer.is_initialized = True
            else:
                if hasattr(data, "packed"):
                    raise ValueError(f"{path}: layer {i}: a quantized layer where the header "
                                     "says unquantized")
                k, v, dt = data
                tdt = getattr(torch, dt)
                k = torch.from_numpy(k).to(device=dev, dtype=tdt)
                v = torch.from_numpy(v).to(device=dev, dtype=tdt)
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
        return cache


# --- greedy decoding with the whole step in one CUDA graph --------------------------------------
def _cache_kwarg(model) -> str:
    """The forward's name for the cache: ``cache`` (transformers >= 5.25 renames it) or
    ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def graphed_generate(model, input_ids, max_new_tokens: int, attention_mask=None,
                     oscar_config=None, cuda_graph: bool | None = None):
    """Greedy decoding on an OScaR cache with each decode step (every layer's append and
    packed-cache attention, the rest of the model, the argmax) replayed from one CUDA graph.

    ``model.generate()`` runs each step eagerly (a transformers forward costs host time per
    layer); this loop captures the model's one-token forward once and replays it, like
    transformers' compiled ``StaticCache`` path does for bf16, but over the packed cache:

    1. prefill: one eager forward over the prompt (``attention_mask``: left padding only), which
       quantizes it (``OScaRCache(max_cache_len=prompt + max_new_tokens)``: capacity reserved);
    2. every layer switches to the graphable decode (:meth:`OScaRLayer.begin_static`: lengths on
       the device, no mask, per-row starts uploaded once);
    3. the first new token's step runs eagerly (it also builds every launch plan), the second is
       captured (``cuda_graph``; default: on CUDA) and replayed for the rest; the token ids and
       positions live in device buffers that the graph advances itself.

    Returns ``(tokens [batch, max_new_tokens] int64, cache)``; the tokens equal
    ``model.generate(..., do_sample=False, past_key_values=OScaRCache(...))`` (tested on the
    reference backend, where ``cuda_graph=False`` runs the same static step eagerly). Every
    layer must be quantized, q_len is 1, no sampling, no stopping criteria; sliding-window
    layers only where the window holds the whole run.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 \
            or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids: expected an integer tensor [batch, prompt_len], got "
                        f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
    batch, prompt = (int(x) for x in input_ids.shape)
    max_len = prompt + max_new_tokens
    text = _text_config(model.config)
    window = getattr(text, "sliding_window", None)
    if window is not None and "sliding_attention" in (getattr(text, "layer_types", None) or
                                                      ["sliding_attention"]) \
            and max_len > int(window):
        raise ValueError(f"graphed_generate: prompt + max_new_tokens = {max_len} exceeds the "
                         f"model's sliding window ({window}); the graphable decode has no "
                         "window (use model.generate with OScaRCache)")
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and max_len > int(limit):
        raise ValueError(f"graphed_generate: prompt + max_new_tokens = {max_len} exceeds "
                         f"max_position_embeddings ({limit})")
    cache = OScaRCache(model.config, oscar_config, max_cache_len=max_len)
    if not all(isinstance(layer, OScaRLayer) for layer in cache.layers):
        raise ValueError("graphed_generate: every layer must be quantized (a configuration of "
                         "None leaves a growing dense layer, which a CUDA graph cannot hold)")
    device = input_ids.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: needs the model on a CUDA device, got {device}")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != (batch, prompt):
        raise ValueError(f"attention_mask: expected shape {(batch, prompt)}, got "
                         f"{tuple(attention_mask.shape)}")
    # positions as generate() computes them: the count of valid tokens before each one
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    kw = {_cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                **kw)
    nxt = out.logits[:, -1].argmax(-1)
    tokens = torch.empty((batch, max_new_tokens), dtype=torch.long, device=device)
    tokens[:, 0] = nxt
    if max_new_tokens == 1:
        return tokens, cache
    hq = int(text.num_attention_heads)
    for layer in cache.layers:
        layer.begin_static(max_len, hq, model.dtype)  # queries come in the model's dtype
    ids = nxt[:, None].clone()
    pos = attention_mask.long().sum(-1, keepdim=True)  # the next token's position

    def step():
        logits = model(input_ids=ids, position_ids=pos, **kw).logits
        token = logits[:, -1].argmax(-1)
        ids.copy_(token[:, None])
        pos.add_(1)
        return token

    try:
        tokens[:, 1] = step()  # eager: builds every launch plan before a capture
        if cuda_graph and max_new_tokens > 2:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    token = step()
            except RuntimeError as exc:  # e.g. a host synchronization inside the model's step
                raise RuntimeError(
                    f"graphed_generate: capturing the model's decode step in a CUDA graph "
                    f"failed ({exc}); cuda_graph=False runs the same step eagerly") from exc
            for t in range(2, max_new_tokens):
                graph.replay()
                tokens[:, t] = token
        else:
            for t in range(2, max_new_tokens):
                tokens[:, t] = step()
    finally:
        for layer in cache.layers:
            layer.end_static()
    for layer in cache.layers:
        layer.cache.check()  # a capacity overflow inside the graph is flagged, never written
    return tokens, cache


__all__ = ["OScaRCache", "OScaRLayer", "OScaRMask", "oscar_attention", "oscar_mask",
           "graphed_generate", "layer_configs", "ATTN_IMPLEMENTATION", "MAX_DECODE_ROWS",
           "MAX_HEAD_GROUPS",
           "SUPPORTED_MODEL_TYPES"]
