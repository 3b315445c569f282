"""The one configuration object of oscar: what is quantized, how, and what stays in full precision.

The defaults are the paper's main configuration (SPEC section 2). Every ablation of the paper is a
configuration, not separate code:

=========================  ==============================================================
KIVI-style INT2             ``OScaRConfig(rotate_keys=False, scale_tokens=False, rotate_values=False)``
rotation only               ``OScaRConfig(scale_tokens=False)``
scaling only                ``OScaRConfig(rotate_keys=False)``
OScaR INT2 (default)        ``OScaRConfig()``
=========================  ==============================================================
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

#: Bit widths with a quantizer and a packed layout (codes per uint32 word = 32 // bits).
SUPPORTED_BITS = (2, 4, 8)
#: Key groups are runs of consecutive tokens; the packed key layout tiles tokens by 32 (one warp),
#: so a key group is a whole number of tiles.
SUPPORTED_KEY_GROUP_SIZES = (32, 64, 128)
#: head_dim is a power of two in this range (the Walsh-Hadamard transform needs a power of two).
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256
NORM_SCOPES = ("token", "head")
PARAM_DTYPES = ("float16", "float32")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _as_int(name: str, value, allowed=None) -> int:
    """``value`` as a Python int: ints and NumPy integers are accepted, bools are not."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)  # NumPy integers become Python ints (hashing, JSON, equality stay plain)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value}")
    return value


def _as_bool(name: str, value) -> bool:
    """``value`` as a Python bool: bools and ``numpy.bool_`` are accepted, ints are not."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} "
                        f"{value!r}")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class OScaRConfig:
    """Quantization settings of an OScaR KV cache (frozen; validated on construction).

    Args:
        key_bits: bits per key code, 2, 4 or 8.
        value_bits: bits per value code, 2, 4 or 8.
        key_group_size: keys are quantized per channel over groups of this many consecutive
            tokens (32, 64 or 128).
        value_group_size: values are quantized per token over groups of this many consecutive
            channels; must divide head_dim (checked when a cache is built).
        residual_length: the most recent tokens kept unquantized, R; a positive multiple of
            key_group_size. When the residual reaches R tokens they are quantized as one block.
        rotate_keys: apply the normalized Walsh-Hadamard rotation to keys (Canalized Rotation).
        scale_tokens: divide each (rotated) key token by its L2 norm (Omni-Token Scaling) and
            store the norm.
        rotate_values: apply the rotation to values too (equivalent to folding H into W_v, W_o).
        norm_scope: ``"token"``: one norm per token over all KV heads (paper); ``"head"``: one
            norm per token and KV head (useful when heads are sharded over GPUs).
        param_dtype: storage dtype of the (scale, min) pairs, ``"float16"`` or ``"float32"``.
    """

    key_bits: int = 2
    value_bits: int = 2
    key_group_size: int = 32
    value_group_size: int = 32
    residual_length: int = 128
    rotate_keys: bool = True
    scale_tokens: bool = True
    rotate_values: bool = True
    norm_scope: str = "token"
    param_dtype: str = "float16"

    def __post_init__(self):
        # NumPy integers and bools are accepted and stored as Python int/bool (frozen: setattr
        # through object).
        norm = lambda name, value: object.__setattr__(self, name, value)
        norm("key_bits", _as_int("key_bits", self.key_bits, SUPPORTED_BITS))
        norm("value_bits", _as_int("value_bits", self.value_bits, SUPPORTED_BITS))
        norm("key_group_size",
             _as_int("key_group_size", self.key_group_size, SUPPORTED_KEY_GROUP_SIZES))
        norm("value_group_size", _as_int("value_group_size", self.value_group_size))
        if not _is_power_of_two(self.value_group_size) or self.value_group_size > MAX_HEAD_DIM:
            raise ValueError(
                "value_group_size must be a power of two dividing head_dim (at most "
                f"{MAX_HEAD_DIM}), got {self.value_group_size}"
            )
        if self.value_group_size < 32 // self.value_bits:
            raise ValueError(
                f"value_group_size must be at least {32 // self.value_bits} for value_bits="
                f"{self.value_bits} (one packed uint32 word never spans two groups), "
                f"got {self.value_group_size}"
            )
        norm("residual_length", _as_int("residual_length", self.residual_length))
        if self.residual_length <= 0 or self.residual_length % self.key_group_size:
            raise ValueError(
                "residual_length must be a positive multiple of key_group_size "
                f"({self.key_group_size}), got {self.residual_length}"
            )
        for name in ("rotate_keys", "scale_tokens", "rotate_values"):
            norm(name, _as_bool(name, getattr(self, name)))
        if self.norm_scope not in NORM_SCOPES:
            raise ValueError(f"norm_scope must be one of {NORM_SCOPES}, got {self.norm_scope!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"param_dtype must be one of {PARAM_DTYPES}, got {self.param_dtype!r}"
            )

    def check_head_dim(self, head_dim: int, name: str = "head_dim") -> None:
        """Raise ValueError unless this configuration supports ``head_dim``."""
        if not _is_power_of_two(head_dim) or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
            raise ValueError(
                f"{name} must be a power of two from {MIN_HEAD_DIM} to {MAX_HEAD_DIM}, "
                f"got {head_dim}"
            )
        if head_dim % self.value_group_size:
            raise ValueError(
                f"value_group_size ({self.value_group_size}) must divide {name} ({head_dim})"
            )

    @property
    def is_kivi(self) -> bool:
        """True for the KIVI-style configuration (no rotation, no token scaling)."""
        return not (self.rotate_keys or self.scale_tokens or self.rotate_values)

    def replace(self, **changes) -> "OScaRConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        """Average stored bits per K or V element of the quantized part (codes, params, norms)."""
        param_bits = 16 if self.param_dtype == "float16" else 32
        k = self.key_bits + 2 * param_bits / self.key_group_size
        v = self.value_bits + 2 * param_bits / self.value_group_size
        norm = 0.0
        if self.scale_tokens:
            per = 1 if self.norm_scope == "token" else num_kv_heads
            norm = 32 * per / (num_kv_heads * head_dim)
        return (k + v + norm) / 2
