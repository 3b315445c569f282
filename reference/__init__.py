"""The NumPy/SciPy reference implementation of OScaR: the oracle every kernel is tested against.

Every function here is vectorized NumPy, exact about float32 rounding order where the kernels must
reproduce it bit for bit (rotation, norms, quantizer, packing), and documented with the shapes it
takes. The same stage names exist in :mod:`oscar.kernels_numba`.
"""

from .hadamard import hadamard_matrix, hadamard_transform
from .norms import token_norms, safe_norms
from .quantize import (
    quantize_groups,
    dequantize_groups,
    quantize_keys,
    quantize_values,
    dequantize_keys,
    dequantize_values,
)
from .pack import (
    TILE_TOKENS,
    codes_per_word,
    pack_key_codes,
    unpack_key_codes,
    pack_value_codes,
    unpack_value_codes,
    value_code_location,
    pack_value_params,
    unpack_value_params,
    value_param_location,
)
from .block import PackedBlock, quantize_block, dequantize_block, concat_blocks
from .attention import decode_attention, attention_dense

__all__ = [
    "hadamard_matrix", "hadamard_transform", "token_norms", "safe_norms",
    "quantize_groups", "dequantize_groups", "quantize_keys", "quantize_values",
    "dequantize_keys", "dequantize_values", "TILE_TOKENS", "codes_per_word",
    "pack_key_codes", "unpack_key_codes", "pack_value_codes", "unpack_value_codes",
    "value_code_location", "pack_value_params", "unpack_value_params", "value_param_location",
    "PackedBlock", "quantize_block", "dequantize_block", "concat_blocks",
    "decode_attention", "attention_dense",
]
