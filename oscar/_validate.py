"""One place that owns the wording of every input error (shapes, dtypes, devices, values).

Messages follow one pattern: ``"<argument>: expected <what>, got <what>"``.
"""

from __future__ import annotations

import numpy as np

#: Input dtypes the cache accepts for keys, values and queries.
FLOAT_DTYPES = ("float16", "bfloat16", "float32")


_IS_TORCH: dict = {}  # type -> is it a torch tensor type (memo: this runs on every call)
_TORCH_DTYPE_NAMES: dict = {}  # torch.dtype -> its name


def is_torch(x) -> bool:
    t = type(x)
    r = _IS_TORCH.get(t)
    if r is None:
        r = _IS_TORCH[t] = t.__module__.split(".")[0] == "torch" and hasattr(x, "is_cuda")
    return r


def dtype_name(x) -> str:
    """'float16' / 'bfloat16' / 'float32' / ... for NumPy arrays and torch tensors."""
    if is_torch(x):
        name = _TORCH_DTYPE_NAMES.get(x.dtype)
        if name is None:
            name = _TORCH_DTYPE_NAMES[x.dtype] = str(x.dtype).replace("torch.", "")
        return name
    return np.asarray(x).dtype.name if not hasattr(x, "dtype") else np.dtype(x.dtype).name


def device_name(x) -> str:
    if is_torch(x):
        return str(x.device)
    return "cpu (numpy)"


def check_array(name: str, x) -> None:
    """TypeError unless ``x`` is a NumPy array or a torch tensor."""
    if not (isinstance(x, np.ndarray) or is_torch(x)):
        raise TypeError(f"{name}: expected a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def check_rank4(name: str, x, dims: str) -> tuple:
    check_array(name, x)
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(f"{name}: expected a 4-D array [{dims}], got shape {shape}")
    if any(s == 0 for s in shape[:2]) or shape[3] == 0:
        raise ValueError(f"{name}: expected non-empty dimensions [{dims}], got shape {shape}")
    return shape


def check_float_dtype(name: str, x) -> str:
    dt = dtype_name(x)
    if dt not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected dtype in {FLOAT_DTYPES}, got {dt}"
            + (" (convert with .astype(np.float32))" if dt == "float64" else "")
        )
    return dt


def check_finite(name: str, x32: np.ndarray) -> None:
    """ValueError if a float32 NumPy array holds NaN or Inf (names the first bad index)."""
    bad = ~np.isfinite(x32)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: expected finite values, got {x32[idx]} at index {idx} "
            f"({int(bad.sum())} non-finite elements)"
        )


def check_kv(k, v, k_name: str = "k", v_name: str = "v"):
    """Validate a K/V pair: 4-D ``[batch, num_kv_heads, seq_len, head_dim]``, same shape/dtype."""
    dims = "batch, num_kv_heads, seq_len, head_dim"
    ks = check_rank4(k_name, k, dims)
    vs = check_rank4(v_name, v, dims)
    if ks != vs:
        raise ValueError(f"{v_name}: expected the shape of {k_name} {ks}, got {vs}")
    kd = check_float_dtype(k_name, k)
    vd = check_float_dtype(v_name, v)
    if kd != vd:
        raise TypeError(f"{v_name}: expected the dtype of {k_name} ({kd}), got {vd}")
    if device_name(k) != device_name(v):
        raise ValueError(f"{v_name}: expected the device of {k_name} ({device_name(k)}), "
                         f"got {device_name(v)}")
    return ks, kd


def to_numpy_f32(x) -> np.ndarray:
    """A float32 NumPy copy/view of a NumPy array or a CPU torch tensor (bfloat16 is exact)."""
    if is_torch(x):
        import torch

        return x.detach().to(torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)
