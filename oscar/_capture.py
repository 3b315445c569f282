"""Load a Hugging Face causal LM, run it once on a text, and capture every layer's post-RoPE
queries, keys and values (the tensors a KV cache would hold). Used by :mod:`oscar.doctor`.

How: transformers (>= 4.48, 5.x) dispatches attention through ``AttentionInterface``; we register
one function, ``"oscar_capture"``, that records ``(query, key, value)`` of each call and then runs
the ordinary SDPA attention, so the model computes exactly what it computes with
``attn_implementation="sdpa"``. The mask function of SDPA is registered under the same name.
A model whose attention does not call the interface records nothing, and that is an error naming
the model type.

transformers and torch are imported here only (the core of oscar does not need them).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np

from ._corpus import PROSE, SOURCES

CAPTURE_NAME = "oscar_capture"
#: Seed of the token ids drawn when the model has no tokenizer (random-weight test models).
RANDOM_IDS_SEED = 0


@dataclasses.dataclass
class LayerQKV:
    """One attention layer of one forward pass (batch 1), as float32 NumPy.

    Attributes:
        q: ``[1, num_q_heads, num_positions, head_dim]``: the queries at the sampled positions.
        k, v: ``[1, num_kv_heads, seq_len, head_dim]``: all keys and values.
        scale: the softmax scale the model uses (``scaling``; usually ``1/sqrt(head_dim)``).
        sliding_window: the layer's sliding window, or None (full causal attention).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    scale: float
    sliding_window: int | None


@dataclasses.dataclass
class Capture:
    """Everything one forward pass gave: per-layer tensors and where they came from."""

    model: str
    model_type: str
    dtype: str
    device: str
    token_source: str
    token_ids: np.ndarray
    positions: np.ndarray
    layers: list


class _Recorder:
    def __init__(self, positions, progress):
        self.positions = positions
        self.progress = progress
        self.layers = {}
        self.order = 0

    def record(self, module, query, key, value, kwargs):
        idx = getattr(module, "layer_idx", None)
        idx = self.order if idx is None else int(idx)
        self.order += 1
        if kwargs.get("softcap") is not None:
            raise ValueError("attention logit soft-capping is not supported by OScaR's decode "
                             "attention (the cache has no soft-cap)")
        if key.shape[-1] != value.shape[-1]:
            raise ValueError(f"layer {idx}: keys and values have different head_dim "
                             f"({key.shape[-1]} vs {value.shape[-1]}); OScaR's cache needs one")
        pos = self.positions
        scale = kwargs.get("scaling")
        scale = getattr(module, "scaling", None) if scale is None else scale
        self.layers[idx] = LayerQKV(
            q=_to_numpy(query[:, :, pos.to(query.device)]), k=_to_numpy(key), v=_to_numpy(value),
            scale=1.0 / math.sqrt(key.shape[-1]) if scale is None else float(scale),
            sliding_window=kwargs.get("sliding_window"))
        if self.progress is not None:
            self.progress.update(1)


def _to_numpy(x):
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


_ACTIVE: _Recorder | None = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE is not None:
        _ACTIVE.record(module, query, key, value, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)


def _import_transformers():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError("--model needs torch and transformers: pip install transformers "
                          f"torch ({exc})") from exc


def load_config(name: str):
    """The model's config, after checking that it names a causal LM (ValueError otherwise)."""
    _import_transformers()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"{name}: not a Hugging Face model directory (no config.json)")
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ValueError(f"{name}: no such directory")  # a path, not a hub name (org/model)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        where = "" if os.path.isdir(name) else " (not a local directory; the hub was tried)"
        raise ValueError(f"{name}: cannot read the model config{where}: {exc}") from None
    model_type = getattr(config, "model_type", "?")
    causal = set(_flatten(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))
    archs = list(getattr(config, "architectures", None) or [])
    if (getattr(config, "is_encoder_decoder", False)
            or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            or (archs and not any(a in causal for a in archs))):
        raise ValueError(f"{name}: not a causal LM (model_type {model_type!r}, architectures "
                         f"{archs or 'unset'}); --model needs a decoder-only model that "
                         "AutoModelForCausalLM loads")
    return config


def _flatten(values):
    for v in values:
        yield from (v if isinstance(v, (tuple, list)) else (v,))


def load_model(name: str, config, device: str):
    """The model with the capture attention, in eval mode on ``device``, and its tokenizer or
    None (random-weight test models often have none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    _register()
    # float32 on the CPU (bf16 matmuls are slow there); the checkpoint's dtype on CUDA
    dtype = torch.float32 if device == "cpu" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=CAPTURE_NAME,
                                                     dtype=dtype)
    except ValueError as exc:
        if CAPTURE_NAME in str(exc) or "attn_implementation" in str(exc):
            raise ValueError(f"{name}: the attention of model_type {config.model_type!r} cannot "
                             f"be hooked (it does not support custom attention functions: "
                             f"{exc})") from None
        raise ValueError(f"{name}: cannot load the model: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{name}: cannot load the model weights: {exc}") from None
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001 - any failure means "no usable tokenizer": say so, go on
        tokenizer = None
    # transformers 5 builds an *empty* tokenizer for some model types (Qwen2/3) when the
    # directory has no vocabulary files; it encodes every text to nothing
    if tokenizer is not None and (len(tokenizer) <= 1 or not tokenizer(PROSE[:200])["input_ids"]):
        tokenizer = None
    return model, tokenizer


def token_ids(tokenizer, vocab_size: int, num_tokens: int, text: str | None,
              text_name: str | None = None):
    """``(ids [num_tokens or fewer], description)``.

    The built-in prose is repeated up to ``num_tokens``; a user text is tokenized once and cut at
    ``num_tokens`` (never repeated). Without a tokenizer, seeded random ids over the vocabulary.
    """
    if tokenizer is None:
        if text is not None:
            raise ValueError(f"--text {text_name}: the model has no tokenizer to encode it "
                             "(save one next to the model, or drop --text)")
        ids = np.random.default_rng(RANDOM_IDS_SEED).integers(0, vocab_size, num_tokens)
        return ids, (f"no tokenizer in the model directory: {num_tokens} random token ids "
                     f"(seed {RANDOM_IDS_SEED}) over the vocabulary of {vocab_size}")
    if text is None:
        ids = list(tokenizer(PROSE)["input_ids"])
        body = list(tokenizer(PROSE, add_special_tokens=False)["input_ids"])
        while len(ids) < num_tokens and body:
            ids += body
        src = f"built-in public-domain prose ({'; '.join(SOURCES)}), repeated"
    else:
        ids = list(tokenizer(text)["input_ids"])
        src = f"{text_name} ({len(ids)} tokens)"
    ids = np.asarray(ids[:num_tokens], np.int64)
    if ids.size and int(ids.max()) >= vocab_size:
        raise ValueError(f"the tokenizer produced id {int(ids.max())} outside the model's "
                         f"vocabulary ({vocab_size})")
    return ids, src


def capture(model, ids: np.ndarray, positions: np.ndarray, progress=None) -> list:
    """Run ``model`` once on ``ids`` and return one :class:`LayerQKV` per layer, in order."""
    import torch

    global _ACTIVE
    num_layers = model.config.get_text_config().num_hidden_layers
    rec = _Recorder(torch.as_tensor(positions), progress)
    base = getattr(model, model.base_model_prefix, model)  # skip the LM head: no logits needed
    device = next(model.parameters()).device
    _ACTIVE = rec
    try:
        with torch.inference_mode():
            base(input_ids=torch.as_tensor(ids, device=device)[None], use_cache=False)
    finally:
        _ACTIVE = None
    model_type = model.config.model_type
    if not rec.layers:
        raise ValueError(f"model_type {model_type!r}: no attention call went through "
                         "transformers' AttentionInterface, so its attention cannot be hooked")
    missing = sorted(set(range(num_layers)) - set(rec.layers))
    if missing:
        raise ValueError(f"model_type {model_type!r}: layers {missing} were not captured (their "
                         "attention does not go through AttentionInterface)")
    return [rec.layers[i] for i in range(num_layers)]


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (tqdm comes with transformers), or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
