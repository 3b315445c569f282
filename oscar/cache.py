"""The quantized KV cache of one attention layer (SPEC section 4).

A cache of ``seq_len`` tokens holds ``quantized_len = floor(seq_len / R) * R`` tokens in packed
form (docs/format.md) and ``residual_len = seq_len - quantized_len`` most recent tokens in the
input dtype. Appending fills the residual; when it reaches R tokens they are quantized as one
block and the residual empties. Blocks are independent, so the packed bytes do not depend on how
the tokens arrived (all at once, one by one, or in chunks).

The storage lives with a backend: NumPy arrays for the reference backend (NumPy inputs and CPU
torch tensors), torch CUDA tensors for the Numba backend. The public methods are the same.
"""

from __future__ import annotations

import numpy as np

from . import _validate as V
from .config import OScaRConfig
from .reference.block import (
    PackedBlock,
    check_residual_tokens,
    concat_blocks,
    dequantize_block,
    empty_block,
    quantize_block,
)

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
_NUMPY_RESIDUAL_DTYPE = {"float16": np.float16, "float32": np.float32,
                         # NumPy has no bfloat16: bfloat16 values are held exactly in float32
                         "bfloat16": np.float32}


def uniform_length(lens: np.ndarray, name: str) -> int:
    """The common value of per-row lengths ``lens`` (int64 ``[batch]``); ValueError naming
    ``name`` when the rows differ (a variable-length cache: use the per-row ``*_lens``)."""
    if lens.size <= 64:  # a decode loop reads this every step: Python beats NumPy on a few rows
        ls = lens.tolist()
        first = ls[0]
        uniform = all(x == first for x in ls)
    else:
        first = int(lens[0])
        uniform = not (lens != first).any()
    if not uniform:
        raise ValueError(f"{name}: the cache's rows have different lengths (seq_lens "
                         f"{lens.tolist() if lens.size <= 16 else '...'}); use the per-row "
                         f"{name.replace('_len', '_lens')} or select_batch() one row")
    return first


def _token_axis(name: str, tokens: int, config: OScaRConfig) -> int:
    """Length along the token axis (axis 2) of packed array ``name`` for ``tokens`` tokens."""
    if name == "k_codes":
        return tokens // 32
    if name == "k_params":
        return tokens // config.key_group_size
    return tokens


class RowLengths:
    """Per-row packed / residual token counts derived from ``_row_lengths()`` (int64 ``[batch]``
    total tokens per row), and their single values when every row has the same length."""

    @property
    def quantized_lens(self) -> np.ndarray:
        """Packed tokens of each row, total // residual_length * residual_length."""
        r = self.config.residual_length
        return self._row_lengths() // r * r

    @property
    def residual_lens(self) -> np.ndarray:
        """Residual (unquantized) tokens of each row, total % residual_length."""
        return self._row_lengths() % self.config.residual_length

    @property
    def quantized_len(self) -> int:
        """Tokens held in packed form (a multiple of residual_length); ValueError when the rows
        have different lengths (use :attr:`quantized_lens`)."""
        return uniform_length(self.quantized_lens, "quantized_len")

    @property
    def residual_len(self) -> int:
        """Most recent tokens held unquantized (0 .. residual_length - 1); ValueError when the
        rows have different lengths (use :attr:`residual_lens`)."""
        return uniform_length(self.residual_lens, "residual_len")


class ReferenceStore(RowLengths):
    """Storage and operations of the reference backend (NumPy arrays on the host).

    Rows have their own lengths (``seq_lens``, int64 ``[batch]``): row b holds
    ``quantized_lens[b] = seq_lens[b] // R * R`` packed tokens (the first ones of the packed
    arrays' token axis, which is as long as the longest row; the rest of a shorter row is
    padding that nothing reads) and ``residual_lens[b] = seq_lens[b] % R`` residual tokens.
    """

    backend = "reference"

    def __init__(self, batch, num_kv_heads, head_dim, dtype, config: OScaRConfig):
        self.config = config
        self.dtype = dtype
        self.block = empty_block(batch, num_kv_heads, head_dim, config)
        r = config.residual_length
        rdt = _NUMPY_RESIDUAL_DTYPE[dtype]
        self.k_res = np.zeros((batch, num_kv_heads, r, head_dim), rdt)
        self.v_res = np.zeros((batch, num_kv_heads, r, head_dim), rdt)
        self.seq_lens = np.zeros(batch, np.int64)
        # The container of the first tokens ("numpy" or "torch"; None before any): fixed for
        # the cache's life, so that dequantize_kv's output container never changes under it.
        self.container = None

    @property
    def torch_inputs(self) -> bool:
        """True for a torch-built cache (dequantize_kv then returns torch tensors)."""
        return self.container == "torch"

    def adopt_container(self, name, x) -> None:
        """Fix the cache's container from its first input ``x``; TypeError for a different one."""
        kind = "torch" if V.is_torch(x) else "numpy"
        if self.container is None:
            self.container = kind
        elif kind != self.container:
            want = "torch.Tensor" if self.container == "torch" else "numpy.ndarray"
            raise TypeError(f"{name}: expected a {want} (the cache was built from "
                            f"{self.container} inputs), got {type(x).__name__}")

    # --- lengths -----------------------------------------------------------------------------
    def lengths_host(self) -> np.ndarray:
        """Per-row total tokens, int64 ``[batch]`` (a copy)."""
        return self.seq_lens.copy()

    def _row_lengths(self) -> np.ndarray:
        return self.seq_lens

    def known_lengths(self) -> np.ndarray:
        """The rows' lengths without synchronizing (always known on the host)."""
        return self.seq_lens

    def check_device(self, name, x) -> None:
        if V.is_torch(x) and x.is_cuda:
            raise ValueError(f"{name}: expected a CPU tensor or NumPy array for a "
                             f"reference-backend cache, got a tensor on {x.device}")
        if self.container is not None:
            self.adopt_container(name, x)

    def _rounded(self, names, k, v):
        """float32 copies of ``k, v``, checked finite and rounded to the residual dtype (values
        are rounded to it before quantization, exactly as a cache holding them in that dtype
        would see them)."""
        k32 = V.to_numpy_f32(k)
        v32 = V.to_numpy_f32(v)
        V.check_finite(names[0], k32)
        V.check_finite(names[1], v32)
        rdt = self.k_res.dtype
        return k32.astype(rdt).astype(np.float32), v32.astype(rdt).astype(np.float32)

    def append(self, k, v, names=("k", "v")) -> None:
        """Append validated tokens ``[B, H, n, D]`` (NumPy or CPU torch) to every row, each at
        its own length; ``names`` are the caller's argument names for error messages."""
        k32, v32 = self._rounded(names, k, v)
        if (self.seq_lens != self.seq_lens[0]).any():  # variable-length rows: row by row
            self._append_rows(np.arange(self.k_res.shape[0]), k32, v32, names)
        else:
            self._append_uniform(k32, v32, names)
        self.adopt_container("k", k)

    def _append_uniform(self, k32, v32, names) -> None:
        r = self.config.residual_length
        n = k32.shape[2]
        filled = int(self.residual_lens[0])
        # New tokens that complete windows: the stored residual plus these are quantized as one
        # block (windows are independent: same bytes as one window at a time), *before* any
        # state changes, so that an append the quantizer rejects (float16 range) leaves the
        # cache as it was.
        take = max(0, (filled + n) // r * r - filled)
        # Tokens that stay in the residual are checked now against what their flush will need
        # (float16 range): an unquantizable token is rejected by the append that brings it, not
        # by a later flush that it would then block forever.
        check_residual_tokens(self.k_res[:, :, : 0 if take else filled].astype(np.float32),
                              k32[:, :, take:], v32[:, :, take:], self.config, names)
        if take:
            new = self._quantize_named(
                names,
                np.concatenate((self.k_res[:, :, :filled].astype(np.float32),
                                k32[:, :, :take]), axis=2),
                np.concatenate((self.v_res[:, :, :filled].astype(np.float32),
                                v32[:, :, :take]), axis=2),
            )
            self._place(slice(None), int(self.quantized_lens[0]), new)
            filled = 0
        rest = n - take
        self.k_res[:, :, filled : filled + rest] = k32[:, :, take:]
        self.v_res[:, :, filled : filled + rest] = v32[:, :, take:]
        self.seq_lens += n

    def _append_rows(self, rows, k32, v32, names) -> None:
        """Append ``k32[i], v32[i]`` (float32 ``[len(rows), H, n, D]``, rounded) to row
        ``rows[i]``: every row's new windows are quantized and checked first, then committed
        (an error leaves the cache as it was)."""
        r = self.config.residual_length
        n = k32.shape[2]
        plans = []
        for i, b in enumerate(rows):
            filled = int(self.seq_lens[b] % r)
            take = max(0, (filled + n) // r * r - filled)
            kb, vb = k32[i : i + 1], v32[i : i + 1]
            check_residual_tokens(
                self.k_res[b : b + 1, :, : 0 if take else filled].astype(np.float32),
                kb[:, :, take:], vb[:, :, take:], self.config, names)
            new = None
            if take:
                new = self._quantize_named(
                    names,
                    np.concatenate((self.k_res[b : b + 1, :, :filled].astype(np.float32),
                                    kb[:, :, :take]), axis=2),
                    np.concatenate((self.v_res[b : b + 1, :, :filled].astype(np.float32),
                                    vb[:, :, :take]), axis=2))
            plans.append((b, filled, take, new))
        for i, (b, filled, take, new) in enumerate(plans):
            if new is not None:
                self._place(slice(b, b + 1), int(self.seq_lens[b] // r * r), new)
                filled = 0
            rest = n - take
            self.k_res[b, :, filled : filled + rest] = k32[i, :, take:]
            self.v_res[b, :, filled : filled + rest] = v32[i, :, take:]
            self.seq_lens[b] += n

    def _place(self, rows, pos: int, new: PackedBlock) -> None:
        """Write the packed tokens of ``new`` at token ``pos`` of ``rows`` (a slice), growing
        the token axis (zero padding) when it is too short."""
        cur = self.block.arrays()
        end = pos + new.seq_len
        out = {}
        for name, arr in cur.items():
            need = _token_axis(name, end, self.config)
            if arr.shape[2] < need:
                pad = np.zeros(arr.shape[:2] + (need - arr.shape[2],) + arr.shape[3:], arr.dtype)
                arr = np.concatenate((arr, pad), axis=2)
            else:
                arr = arr.copy() if arr is getattr(self.block, name) else arr
            a = _token_axis(name, pos, self.config)
            arr[rows, :, a:need] = getattr(new, name)
            out[name] = arr
        self.block = PackedBlock(k_codes=out["k_codes"], k_params=out["k_params"],
                                 v_codes=out["v_codes"], v_params=out["v_params"],
                                 norms=out.get("norms"))

    def fill_row(self, row: int, k, v, names=("k", "v")) -> None:
        """Append validated tokens ``[1, H, n, D]`` to row ``row`` only."""
        k32, v32 = self._rounded(names, k, v)
        self._append_rows([row], k32, v32, names)
        self.adopt_container(names[0], k)

    def reset_rows(self, rows: np.ndarray) -> None:
        """Empty rows ``rows`` (validated int64): length 0; their storage is reused."""
        self.seq_lens[rows] = 0

    def _quantize_named(self, names, k, v) -> PackedBlock:
        """quantize_block, its errors naming the caller's arguments (``k_new:`` for append)."""
        try:
            return quantize_block(k, v, self.config)
        except ValueError as exc:
            msg = str(exc)
            for plain, name in zip(("k", "v"), names):
                if msg.startswith(plain + ":") and name != plain:
                    raise ValueError(name + msg[len(plain):]) from None
            raise

    def residual(self):
        """``(k, v)`` float32 ``[B, H, max residual_len, D]`` (rows padded past their own)."""
        n = int(self.residual_lens.max(initial=0))
        return (self.k_res[:, :, :n].astype(np.float32), self.v_res[:, :, :n].astype(np.float32))

    def packed(self) -> PackedBlock:
        """The packed arrays up to the longest row's quantized tokens."""
        t = int(self.quantized_lens.max(initial=0))
        if self.block.seq_len == t:
            return self.block
        b = {n: a[:, :, : _token_axis(n, t, self.config)] for n, a in self.block.arrays().items()}
        return PackedBlock(k_codes=b["k_codes"], k_params=b["k_params"], v_codes=b["v_codes"],
                           v_params=b["v_params"], norms=b.get("norms"))

    def nbytes(self) -> int:
        """Bytes of the valid tokens of every row (packed and residual)."""
        arrays = self.block.arrays()
        ql, rl = self.quantized_lens, self.residual_lens
        total = 0
        for name, a in arrays.items():
            per_row = a[0:1].nbytes // max(1, a.shape[2]) if a.shape[2] else 0
            total += sum(per_row * _token_axis(name, int(t), self.config) for t in ql)
        per_tok = self.k_res.shape[1] * self.k_res.shape[3] * _ITEMSIZE[self.dtype]
        return total + 2 * per_tok * int(rl.sum())

    # --- batch and length edits, loading (beam search, crop, save/load) ------------------------
    def select_batch(self, idx: np.ndarray) -> None:
        """Rows ``idx`` (int64 ``[new_batch]``, validated) of every array, as new arrays."""
        b = self.block
        self.block = PackedBlock(k_codes=b.k_codes[idx], k_params=b.k_params[idx],
                                 v_codes=b.v_codes[idx], v_params=b.v_params[idx],
                                 norms=None if b.norms is None else b.norms[idx])
        self.k_res = self.k_res[idx]
        self.v_res = self.v_res[idx]
        self.seq_lens = self.seq_lens[idx]

    def truncate(self, seq_len: int) -> None:
        """Drop residual tokens after ``seq_len`` (validated: ``quantized_len <= seq_len``)."""
        self.seq_lens[:] = seq_len

    def load_state(self, packed: dict, k_res: np.ndarray, v_res: np.ndarray,
                   quantized_len: int) -> None:
        """Install validated arrays: ``packed`` as in ``PackedBlock.arrays()``, residual tokens
        ``[B, H, residual_len, D]`` (float32 or the residual dtype)."""
        self.block = PackedBlock(k_codes=packed["k_codes"], k_params=packed["k_params"],
                                 v_codes=packed["v_codes"], v_params=packed["v_params"],
                                 norms=packed.get("norms"))
        n = k_res.shape[2]
        self.k_res[:, :, :n] = k_res
        self.v_res[:, :, :n] = v_res
        self.seq_lens[:] = quantized_len + n


class QuantizedKVCache(RowLengths):
    """Packed 2/4/8-bit keys and values of one layer, plus an unquantized residual window.

    Build it with :func:`oscar.quantize_kv` (or :meth:`empty`), stream tokens in with
    :meth:`append`, read it with :func:`oscar.decode_attention` and :func:`oscar.dequantize_kv`.

    Attributes:
        config: the :class:`OScaRConfig` it was built with.
        batch, num_kv_heads, head_dim: the fixed dimensions of every K/V appended.
        dtype: the input dtype name (``"float16"``, ``"bfloat16"`` or ``"float32"``).
        backend: ``"reference"`` (NumPy) or ``"numba"`` (CUDA).
    """

    def __init__(self, store, batch, num_kv_heads, head_dim, dtype, config, device="cpu"):
        self._store = store
        self.batch = batch
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.config = config
        self.device = device

    @classmethod
    def empty(cls, batch, num_kv_heads, head_dim, dtype="float32", config=None,
              backend="reference", device=None, max_seq_len=None, num_q_heads=None):
        """An empty cache: on the host (``backend="reference"``, the default) or on a CUDA device
        (``backend="numba"``, ``device`` e.g. ``"cuda"`` or ``"cuda:1"``).

        On CUDA, ``max_seq_len`` reserves packed storage for that many tokens and the kernels
        of the decode loop are compiled or loaded now (with ``num_q_heads``, the q_len=1 decode
        kernels too), as :func:`oscar.quantize_kv` does.
        """
        config = OScaRConfig() if config is None else config
        if not isinstance(config, OScaRConfig):
            raise TypeError(f"config: expected OScaRConfig, got {type(config).__name__}")
        for name, val in (("batch", batch), ("num_kv_heads", num_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        config.check_head_dim(head_dim)
        if dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of {V.FLOAT_DTYPES}, got {dtype!r}")
        if max_seq_len is not None and (isinstance(max_seq_len, bool)
                                        or not isinstance(max_seq_len, int) or max_seq_len < 0):
            raise ValueError(f"max_seq_len: expected a non-negative int or None, "
                             f"got {max_seq_len!r}")
        from .api import check_num_q_heads

        check_num_q_heads(num_q_heads, num_kv_heads)
        if backend == "numba":
            if device is None:
                raise ValueError("device: expected a CUDA device (e.g. 'cuda') for "
                                 "backend='numba', got None")
            from .api import _numba_backend

            return _numba_backend().empty(batch, num_kv_heads, head_dim, dtype, config, device,
                                          max_seq_len, num_q_heads)
        if backend != "reference":
            raise ValueError(f"backend: expected 'reference' or 'numba', got {backend!r}")
        if device is not None and str(device) != "cpu":
            raise ValueError(f"device: expected None or 'cpu' for backend='reference', "
                             f"got {device!r}")
        store = ReferenceStore(batch, num_kv_heads, head_dim, dtype, config)
        return cls(store, batch, num_kv_heads, head_dim, dtype, config)

    # --- sizes -------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._store.backend

    def _row_lengths(self) -> np.ndarray:
        return self.seq_lens

    @property
    def seq_lens(self) -> np.ndarray:
        """Tokens of each row, int64 NumPy ``[batch]`` (rows may differ: variable-length
        prefill, :meth:`fill_row`, :meth:`reset_rows`). On CUDA after a replayed CUDA graph
        this reads the device lengths (synchronizes; :meth:`sync_lengths`)."""
        return self._store.lengths_host()


    @property
    def seq_len(self) -> int:
        """Tokens of every row; ValueError when the rows differ (use :attr:`seq_lens`)."""
        return uniform_length(self.seq_lens, "seq_len")

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, (scale, min) params, norms, and the residual tokens."""
        return int(self._store.nbytes())

    @property
    def bf16_nbytes(self) -> int:
        """Bytes of a bfloat16 cache of the same tokens (K and V)."""
        return 2 * 2 * self.num_kv_heads * int(self.seq_lens.sum()) * self.head_dim

    @property
    def bits_per_element(self) -> float:
        """Average stored bits per K or V element (``8 * nbytes / (2 B H T D)``)."""
        n = 2 * self.num_kv_heads * int(self.seq_lens.sum()) * self.head_dim
        return 8.0 * self.nbytes / n if n else 0.0

    @property
    def compression(self) -> float:
        """``bf16_nbytes / nbytes`` (how many times smaller than a bfloat16 cache)."""
        return self.bf16_nbytes / self.nbytes if self.nbytes else 1.0

    # --- data --------------------------------------------------------------------------------
    def append(self, k_new, v_new) -> "QuantizedKVCache":
        """Append tokens ``[batch, num_kv_heads, n, head_dim]`` (n >= 1); returns self.

        Full residual windows are quantized as they complete. Raises ValueError/TypeError for
        a shape, dtype or device that does not match the cache, and for NaN/Inf values.
        """
        # a decode loop appends tensors of one kind every step: the checks below depend only on
        # the pair's (type, shape, dtype, device) and the cache's batch, so a torch pair of a
        # kind that passed them on this cache skips them (values are still the store's to check)
        sig = None
        if V.is_torch(k_new) and V.is_torch(v_new):
            sig = (k_new.shape, k_new.dtype, k_new.device, type(k_new), v_new.shape,
                   v_new.dtype, v_new.device, type(v_new), self.batch)
        if sig is None or sig != getattr(self, "_kv_checked", None):
            shape, dt = V.check_kv(k_new, v_new, "k_new", "v_new")
            expected = (self.batch, self.num_kv_heads, shape[2], self.head_dim)
            if shape != expected or shape[2] == 0:
                raise ValueError(
                    "k_new: expected shape [batch, num_kv_heads, n >= 1, head_dim] = "
                    f"[{self.batch}, {self.num_kv_heads}, n, {self.head_dim}], got {shape}"
                )
            if dt != self.dtype:
                raise TypeError(f"k_new: expected dtype {self.dtype} (the cache's), got {dt}")
            self._store.check_device("k_new", k_new)
            self._kv_checked = sig
        if isinstance(self._store, ReferenceStore):
            self._store.append(k_new, v_new, names=("k_new", "v_new"))
        else:
            self._store.append(k_new, v_new)
        return self

    def _check_rows(self, rows, name="rows") -> np.ndarray:
        """``rows`` (an int, or 1-D ints: NumPy, list, torch) as distinct int64 in [0, batch)."""
        if V.is_torch(rows):
            rows = rows.detach().cpu().numpy()
        idx = np.asarray(rows)
        if idx.ndim == 0:
            idx = idx.reshape(1)
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or idx.size == 0:
            raise ValueError(f"{name}: expected a row index or a non-empty 1-D integer array, "
                             f"got {rows!r}")
        idx = idx.astype(np.int64)
        if idx.min() < 0 or idx.max() >= self.batch:
            raise ValueError(f"{name}: expected rows in [0, {self.batch}) (the cache's batch), "
                             f"got {idx.tolist()}")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"{name}: expected distinct rows, got {idx.tolist()}")
        return idx

    def reset_rows(self, rows) -> "QuantizedKVCache":
        """Empty rows ``rows`` (continuous batching: a finished sequence's row is refilled with
        :meth:`fill_row` while the other rows go on); returns self. Nothing is reallocated: the
        row's storage is reused. An empty row's decode output is zeros (lse -inf)."""
        idx = self._check_rows(rows)
        self._store.reset_rows(idx)
        return self

    def fill_row(self, row, k, v) -> "QuantizedKVCache":
        """Append tokens ``k, v [1, num_kv_heads, n, head_dim]`` to row ``row`` only (the prompt
        of a new sequence after :meth:`reset_rows`, or a variable-length prefill row by row);
        returns self. Same validation as :meth:`append`; the other rows are untouched."""
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
            raise TypeError(f"row: expected an int, got {type(row).__name__}")
        (b,) = self._check_rows(int(row), "row")
        shape, dt = V.check_kv(k, v, "k", "v")
        expected = (1, self.num_kv_heads, shape[2], self.head_dim)
        if shape != expected or shape[2] == 0:
            raise ValueError(
                "k: expected shape [1, num_kv_heads, n >= 1, head_dim] = "
                f"[1, {self.num_kv_heads}, n, {self.head_dim}], got {shape}")
        if dt != self.dtype:
            raise TypeError(f"k: expected dtype {self.dtype} (the cache's), got {dt}")
        self._store.check_device("k", k)
        self._store.fill_row(int(b), k, v)
        return self

    def prepare_capture(self, max_seq_len: int, num_q_heads: int | None = None,
                        q_lens=(1,), q_dtype=None) -> "QuantizedKVCache":
        """Make this cache's decode step capturable in a CUDA graph (issue 25); returns self.

        On CUDA: packed room for ``max_seq_len`` tokens per row is reserved now (the capacity
        contract: a captured step cannot reallocate or raise), the lengths move to the device
        (``static``): every :meth:`append` of one token per row launches the append kernel
        (each row at its own length, read and advanced on the device) and the row-flush kernel
        (packs the windows that filled; a no-op for the others), and
        :func:`oscar.decode_attention` plans its launches for any length up to the capacity and
        reads each row's length on the device. No host synchronization, no Python branching on
        lengths: the same launches every step. A row that would pass the capacity takes no
        token and sets a status bit that :meth:`check` raises. Read the lengths back with
        :meth:`sync_lengths` (which leaves the mode). The reference backend has nothing to
        prepare (it validates the arguments and returns).

        The decode steps of the query shapes this cache has warmed (``quantize_kv(...,
        num_q_heads=)``, earlier decodes) and of ``num_q_heads`` x ``q_lens`` in ``q_dtype``
        (default the cache's dtype) are built now, workspaces included: a capture, also by
        ``torch.compile(mode="reduce-overhead")``, must not allocate buffers that the cache
        keeps (CUDA graph trees reject them). A decode that returns ``lse`` builds its step at
        its first call: run it once before capturing.
        """
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 0:
            raise ValueError(f"max_seq_len: expected a non-negative int, got {max_seq_len!r}")
        from .api import check_num_q_heads

        check_num_q_heads(num_q_heads, self.num_kv_heads)
        if isinstance(q_lens, (int, np.integer)):
            q_lens = (q_lens,)
        try:
            q_lens = tuple(q_lens)
        except TypeError:
            raise ValueError(f"q_lens: expected a non-empty sequence of positive ints, got "
                             f"{q_lens!r}") from None
        bad = [x for x in q_lens if isinstance(x, bool) or not isinstance(x, (int, np.integer))
               or x < 1]
        if bad or not len(q_lens):
            raise ValueError(f"q_lens: expected a non-empty sequence of positive ints, got "
                             f"{q_lens!r}")
        if q_dtype is not None:
            q_dtype = str(q_dtype).replace("torch.", "")
            if q_dtype not in ("float16", "bfloat16", "float32"):
                raise ValueError(f"q_dtype: expected float16, bfloat16 or float32, got "
                                 f"{q_dtype!r}")
        longest = int(self.seq_lens.max(initial=0))
        if max_seq_len < longest:
            raise ValueError(f"max_seq_len: expected at least the longest row's seq_len "
                             f"({longest}), got {max_seq_len}")
        if hasattr(self._store, "prepare_capture"):
            self._store.prepare_capture(max_seq_len, num_q_heads, tuple(int(x) for x in q_lens),
                                        q_dtype)
        return self

    @property
    def static(self) -> bool:
        """True while the lengths live on the device (:meth:`prepare_capture`)."""
        return bool(getattr(self._store, "static", False))

    def sync_lengths(self) -> np.ndarray:
        """Read the rows' lengths back from the device after replayed CUDA graphs (synchronizes)
        and leave the capture mode of :meth:`prepare_capture`; returns :attr:`seq_lens`."""
        if hasattr(self._store, "sync_lengths"):
            return self._store.sync_lengths()
        return self.seq_lens

    def reserve(self, seq_len: int) -> "QuantizedKVCache":
        """Pre-allocate packed storage for ``seq_len`` tokens (CUDA caches; no-op on the host).

        A CUDA cache otherwise grows its buffers geometrically when a flush needs room; reserving
        up front avoids any reallocation, which a CUDA-graph decode loop needs.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len: expected a non-negative int, got {seq_len!r}")
        if hasattr(self._store, "reserve"):
            self._store.reserve(seq_len)
        return self

    def check(self) -> "QuantizedKVCache":
        """Raise ValueError if a flush met NaN/Inf or float16 overflow or underflow (synchronizes
        on CUDA).

        The reference backend raises eagerly in :meth:`append`, at the append that brings a
        value it cannot store (so its cache never holds one); the CUDA backend does not
        synchronize there: the token waits in the residual window, the flush that quantizes it
        writes NaN (scale, min) for the affected groups and records the event in a device status
        word that this method reads (and later flushes go on).
        """
        status = self._store.read_status() if hasattr(self._store, "read_status") else 0
        if status & 8:
            raise ValueError("cache: a row reached its packed capacity inside a prepared "
                             "(captured) decode loop; its later tokens were dropped (reserve a "
                             "larger max_seq_len in prepare_capture)")
        if status & 1:
            raise ValueError("cache: a flush met NaN or Inf in k or v; the affected groups "
                             "hold NaN parameters")
        if status & 2:
            raise ValueError("cache: a flush met values outside the float16 range of "
                             "param_dtype='float16'")
        if status & 4:
            raise ValueError("cache: a flush met a group below the float16 normal range (all "
                             "|x| < 6.1e-05, not constant) of param_dtype='float16'; the "
                             "affected groups hold NaN parameters")
        return self

    def packed(self) -> PackedBlock:
        """The packed arrays of the quantized tokens (docs/format.md), backend-native."""
        return self._store.packed()

    def residual(self):
        """``(k, v)`` of the residual tokens, ``[batch, num_kv_heads, residual_len, head_dim]``."""
        return self._store.residual()

    def __repr__(self) -> str:
        lens = self.seq_lens
        if (lens == lens[0]).all():
            r = self.config.residual_length
            t, q = int(lens[0]), int(lens[0]) // r * r
            length = f"seq_len={t} (quantized {q}, residual {t - q})"
        else:
            length = f"seq_lens {int(lens.min())}..{int(lens.max())} (variable)"
        return (f"QuantizedKVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, {length}, dtype={self.dtype}, "
                f"backend={self.backend!r}, {self.bits_per_element:.2f} bits/element)")


    # --- batch and length edits, copies, files (added for generate(): beam search, crop) -------
    def select_batch(self, indices) -> "QuantizedKVCache":
        """Keep, reorder or repeat batch rows: row i becomes old row ``indices[i]``; returns self.

        ``indices``: 1-D integers in ``[0, batch)`` (NumPy array, list or torch tensor; any
        length >= 1, repeats allowed). Beam search's reorder, ``num_return_sequences``' repeat
        and batch selection are all this one gather: fancy indexing on the host,
        ``index_select`` along the batch axis on CUDA. Packed arrays and residual alike.
        """
        if V.is_torch(indices):
            idx = indices.detach().cpu().numpy()
        else:
            idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
            raise ValueError(f"indices: expected a non-empty 1-D integer array, got shape "
                             f"{idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.min() < 0 or idx.max() >= self.batch:
            raise ValueError(f"indices: expected values in [0, {self.batch}) (the cache's "
                             f"batch), got min {idx.min()} max {idx.max()}")
        self._store.select_batch(idx)
        self.batch = int(idx.size)
        return self

    def truncate(self, seq_len: int) -> "QuantizedKVCache":
        """Keep the first ``seq_len`` tokens (speculative decoding's rollback); returns self.

        Only residual tokens can be dropped: ``quantized_len <= seq_len <= self.seq_len``, else
        ValueError (quantized windows are packed as a whole and cannot be un-quantized).
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int):
            raise TypeError(f"seq_len: expected an int, got {type(seq_len).__name__}")
        if not self.quantized_len <= seq_len <= self.seq_len:
            raise ValueError(
                f"seq_len: expected {self.quantized_len} <= seq_len <= {self.seq_len}: only the "
                f"{self.residual_len} residual tokens can be dropped (the first "
                f"{self.quantized_len} are quantized in windows of residual_length="
                f"{self.config.residual_length}), got {seq_len}")
        self._store.truncate(seq_len)
        return self

    def copy(self) -> "QuantizedKVCache":
        """An independent deep copy (same backend and device)."""
        import copy

        return copy.deepcopy(self)

    def save(self, path) -> None:
        """Write the cache to a safetensors file (oscar/_serialize.py, docs/integrations.md)."""
        from . import _serialize

        _serialize.save_caches(path, [_serialize.layer_entry(self)])

    @classmethod
    def load(cls, path, device=None) -> "QuantizedKVCache":
        """Read a cache written by :meth:`save`; ``device`` None/"cpu": reference backend, a CUDA
        device: Numba backend. Bit-exact round trip; a file of another format version, a
        truncated file or arrays of the wrong shape or dtype raise ValueError."""
        from . import _serialize

        layers, _ = _serialize.load_caches(path, device)
        if len(layers) != 1 or not isinstance(layers[0], cls):
            raise ValueError(f"{path}: expected a file with one quantized layer, got "
                             f"{len(layers)} layers (use OScaRCache.load for model caches)")
        return layers[0]


def dequantize_reference(store: ReferenceStore):
    """``(k_hat, v_hat)`` float32 ``[B, H, seq_len, D]`` of a reference store."""
    k_hat, v_hat = dequantize_block(store.packed(), store.config)
    k_res, v_res = store.residual()
    return (np.concatenate((k_hat, k_res), axis=2), np.concatenate((v_hat, v_res), axis=2))
