"""Per-layer OScaR configurations as a JSON file: what ``oscar report --model --json`` writes and
what the transformers integration reads.

The file (format ``"oscar-layer-configs"``, version 1)::

    {"format": "oscar-layer-configs", "version": 1, "num_layers": 3,
     "layers": [{"key_bits": 2, "value_bits": 2, ...},   # OScaRConfig fields (dataclasses.asdict)
                null,                                    # null: keep this layer unquantized (bf16)
                {"key_bits": 4, ...}],
     "bits_per_element": 4.34}                           # average over layers, unquantized = 16

Other top-level keys (``oscar report --model`` adds ``"report"`` and ``"model"``) are ignored by
the loader, so one file carries both the plan and the measurements behind it. A layer dict may
omit fields (they take the :class:`OScaRConfig` defaults) but may not name unknown ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from .config import OScaRConfig

FORMAT = "oscar-layer-configs"
VERSION = 1
#: Bits per element of a layer kept unquantized: its cache stays in a 16-bit dtype (bf16).
UNQUANTIZED_BITS = 16.0
_FIELDS = tuple(f.name for f in dataclasses.fields(OScaRConfig))


def plan_bits_per_element(configs, num_kv_heads: int, head_dim: int) -> float:
    """Mean stored bits per K/V element over layers (quantized part; None counts as 16)."""
    if not configs:
        raise ValueError("configs: expected at least one layer, got none")
    bits = [UNQUANTIZED_BITS if c is None else c.bits_per_element(num_kv_heads, head_dim)
            for c in configs]
    return sum(bits) / len(bits)


def layer_configs_to_dict(configs, bits_per_element: float, **extra) -> dict:
    """The JSON-ready dict of a per-layer plan (``extra`` adds top-level keys, e.g. report)."""
    configs = list(configs)
    for i, c in enumerate(configs):
        if c is not None and not isinstance(c, OScaRConfig):
            raise TypeError(f"configs[{i}]: expected OScaRConfig or None, got {type(c).__name__}")
    clash = set(extra) & {"format", "version", "num_layers", "layers", "bits_per_element"}
    if clash:
        raise ValueError(f"extra: keys {sorted(clash)} are reserved by the format")
    return {"format": FORMAT, "version": VERSION, "num_layers": len(configs),
            "layers": [None if c is None else dataclasses.asdict(c) for c in configs],
            "bits_per_element": float(bits_per_element), **extra}


def save_layer_configs(path, configs, bits_per_element: float, **extra) -> str:
    """Write a per-layer plan to ``path`` (JSON, indented); returns the path."""
    data = layer_configs_to_dict(configs, bits_per_element, **extra)
    path = os.fspath(path)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def load_layer_configs(path_or_dict) -> list:
    """Read a per-layer plan: a list with one :class:`OScaRConfig` or ``None`` per layer.

    Accepts a path (str or PathLike) to the JSON file or the already-parsed dict. Raises
    ValueError (TypeError for a wrong type) naming the file and the offending key.
    """
    if isinstance(path_or_dict, dict):
        data, src = path_or_dict, "layer configs"
    elif isinstance(path_or_dict, (str, os.PathLike)):
        src = os.fspath(path_or_dict)
        try:
            with open(src) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{src}: no such file") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{src}: not valid JSON ({exc})") from None
    else:
        raise TypeError(f"path_or_dict: expected a path or a dict, got "
                        f"{type(path_or_dict).__name__}")
    if not isinstance(data, dict):
        raise ValueError(f"{src}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ValueError(f"{src}: 'format': expected {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"{src}: 'version': expected {VERSION}, got {data.get('version')!r} "
                         "(written by a newer oscar?)")
    layers, n = data.get("layers"), data.get("num_layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{src}: 'layers': expected a non-empty list, got {layers!r:.60}")
    if isinstance(n, bool) or not isinstance(n, int) or n != len(layers):
        raise ValueError(f"{src}: 'num_layers': expected {len(layers)} (the length of "
                         f"'layers'), got {n!r}")
    bits = data.get("bits_per_element")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float))
                             or not math.isfinite(bits) or bits <= 0):
        raise ValueError(f"{src}: 'bits_per_element': expected a positive number, got {bits!r}")
    return [_layer(src, i, entry) for i, entry in enumerate(layers)]


def _layer(src, i, entry):
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"{src}: layers[{i}]: expected an object of OScaRConfig fields or "
                         f"null, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{src}: layers[{i}]: unknown OScaRConfig fields {unknown} "
                         f"(expected some of {list(_FIELDS)})")
    try:
        return OScaRConfig(**entry)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{src}: layers[{i}]: {exc}") from None
