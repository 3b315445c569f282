"""oscar: 2-bit KV-cache quantization with OScaR (Canalized Rotation + Omni-Token Scaling).

    cfg   = oscar.OScaRConfig()                      # INT2 K/V, group 32, residual 128
    cache = oscar.quantize_kv(k, v, config=cfg)      # k, v: [batch, num_kv_heads, seq_len, head_dim]
    cache.append(k_new, v_new)
    out   = oscar.decode_attention(q, cache)         # q: [batch, num_q_heads, q_len, head_dim]
    k_hat, v_hat = oscar.dequantize_kv(cache)

NumPy arrays and CPU tensors run on the NumPy reference; CUDA tensors on the Numba kernels.
"""

from . import _source_tree

# In a checkout, reference/ and kernels_numba/ sit beside oscar/ (pyproject's package-dir maps
# them into the package when installed): let oscar.reference resolve when Python runs from the
# repository root, where the checkout's oscar/ shadows an installed copy (issue 23).
_source_tree.install(__file__)

from .config import OScaRConfig  # noqa: E402
from .cache import QuantizedKVCache  # noqa: E402
from .api import quantize_kv, decode_attention, dequantize_kv  # noqa: E402
from .paged import PagedKVCache  # noqa: E402
from .runtime import warmup  # noqa: E402

__version__ = "0.1.0"
__all__ = ["OScaRConfig", "QuantizedKVCache", "PagedKVCache", "quantize_kv",
           "decode_attention", "dequantize_kv", "warmup", "__version__"]
