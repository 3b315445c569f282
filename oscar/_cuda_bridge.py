"""The Numba backend: torch CUDA tensors in, Numba kernels on torch's current stream, torch out.

Storage of a CUDA cache is torch tensors on the cache's device (torch's caching allocator, so a
decode step can be captured in a ``torch.cuda.CUDAGraph``). Long-lived buffers are wrapped as Numba
device arrays once, when they are allocated (``cuda.as_cuda_array`` costs ~20 us per call);
per-call tensors (queries, outputs, new tokens) are wrapped per call, zero-copy through
``__cuda_array_interface__``. bfloat16 tensors travel as int16 views (torch exports bfloat16 as a
void type) and the kernels convert the bits.

Capacity: the packed buffers grow geometrically (x2, rounded up to whole residual windows) when a
flush needs more room, so appending T tokens costs O(T) amortized copies and no reallocation per
flush; ``QuantizedKVCache.reserve(seq_len)`` (or ``quantize_kv(..., max_seq_len=...)``) allocates
once up front, which is what a CUDA-graph decode loop wants.

Synchronization: ``decode_attention`` and ``append`` never synchronize with the host. ``quantize_kv``
synchronizes once at the end to raise on NaN/Inf input and float16 overflow (documented cost).
After that, a flush inside ``append`` that meets non-finite values writes NaN (scale, min) for the
affected groups (so exactly the affected attention outputs become NaN) and records it in a device
status word that :meth:`QuantizedKVCache.check` reads.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import _launch
from .cache import QuantizedKVCache, RowLengths
from .config import OScaRConfig
from .kernels_numba._compat import cuda
from .kernels_numba import append as _append
from .kernels_numba import attention as _attn
from .kernels_numba.kernel_cache import launch as _dispatch
from .kernels_numba import dequantize as _deq
from .kernels_numba import quantize as _quant
from .reference.block import PackedBlock

#: status bits written by the quantize kernel (kernels_numba/quantize.py)
STATUS_NONFINITE, STATUS_FP16_OVERFLOW = 1, 2
STATUS_FP16_UNDERFLOW = 4  # a non-constant group entirely below float16's normal range
STATUS_OVERFLOW = _append.STATUS_OVERFLOW  # a device append found no packed capacity left
#: columns of the device lengths array (kernels_numba/common.py)
LEN_START, LEN_QUANTIZED, LEN_RESIDUAL, LEN_FLUSH = (_attn.LEN_START, _attn.LEN_QUANTIZED,
                                                     _attn.LEN_RESIDUAL, 3)
#: OSCAR_DEVICE_APPEND=0: one-token appends outside a prepared capture take the host path (torch
#: copies, host-decided flushes) and copy the lengths to the device, instead of the append_rows
#: kernel (for comparison and as a fallback)
DEVICE_APPEND = os.environ.get("OSCAR_DEVICE_APPEND", "1") != "0"

_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _nb(t: torch.Tensor):
    """Zero-copy Numba view of a torch CUDA tensor (bfloat16 as int16 bits)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return cuda.as_cuda_array(t)


def _rows16(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the layout the quantize kernel reads (16-byte vectors of each row): rows
    contiguous, base address and strides multiples of 16 bytes; otherwise a contiguous copy."""
    es = t.element_size()
    if (t.stride(-1) != 1 or t.data_ptr() % 16
            or any((s * es) % 16 for s in t.stride()[:-1])):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _nb_u32(t: torch.Tensor):
    """Numba uint32 view of an int32 tensor holding packed code words (same bits)."""
    return cuda.as_cuda_array(t).view(np.uint32)


_STREAMS: dict = {}


class _Launch:
    """Context for a launch: Numba on the tensor's device, stream = torch's current stream.

    Numba stream objects are cached per (device, torch stream handle): creating one per call
    costs microseconds that a decode step does not have.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self._ctx = cuda.gpus[self.device.index]
        self._ctx.__enter__()
        handle = torch.cuda.current_stream(self.device).cuda_stream
        key = (self.device.index, handle)
        stream = _STREAMS.get(key)
        if stream is None:
            stream = _STREAMS[key] = cuda.external_stream(handle)
        return stream

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


#: Headroom of a new cache without ``max_seq_len``: packed room for this share of the prompt's
#: quantized tokens, and at least HEADROOM_WINDOWS residual windows, beyond them.
HEADROOM_SHARE = 8  # 1/8 of the prompt
HEADROOM_WINDOWS = 8


def initial_capacity(tokens: int, residual_length: int, max_seq_len: int | None) -> int:
    """Packed tokens a new CUDA cache allocates for a prompt of ``tokens`` tokens.

    With ``max_seq_len``: exactly that (rounded up to whole windows, at least the prompt's
    quantized tokens): a decode loop up to ``max_seq_len`` never reallocates. Without: the
    prompt's quantized tokens plus ``max(1/8 of them, 8 windows)``, so that a generation of up to
    that many tokens does not reallocate either; past it the capacity doubles in one step (a
    reallocation, a copy of the cache and new launch plans: 3-4 ms measured per layer at 32K
    tokens on an H100, docs/benchmarks.md). The headroom costs 1/8 more packed memory on long prompts.
    """
    r = residual_length
    quantized = tokens // r * r
    if max_seq_len is not None:
        return _round_up(max(max_seq_len, quantized, r), r)
    return _round_up(quantized + max(quantized // HEADROOM_SHARE, HEADROOM_WINDOWS * r), r)


class NumbaStore(RowLengths):
    """Packed capacity buffers + residual window of one layer on one CUDA device."""

    backend = "numba"

    def __init__(self, batch, num_kv_heads, head_dim, dtype, config: OScaRConfig, device,
                 capacity: int = 0):
        self.config = config
        self.dtype = dtype
        self.device = device
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        r = config.residual_length
        tdt = _TORCH_DTYPE[dtype]
        self.k_res = torch.zeros((batch, num_kv_heads, r, head_dim), dtype=tdt, device=device)
        self.v_res = torch.zeros_like(self.k_res)
        # per-row lengths: the device array the kernels read (int32 [batch, 4], columns
        # LEN_*), and its host mirror (tokens per row), exact unless ``static`` (prepared for a
        # CUDA graph: the device decides, read back by sync_lengths)
        self.seq_lens = np.zeros(batch, np.int64)
        self.lengths = torch.zeros((batch, _attn.LENGTH_COLUMNS), dtype=torch.int32,
                                   device=device)
        self.static = False
        self._start_set = False  # the lengths' start column may be non-zero
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self.status_nb = cuda.as_cuda_array(self.status)
        self.capacity = 0
        self._dec_cache: dict = {}
        self._q_cache = None
        # launch plans (oscar/_launch.py): per-step decisions and prepared launches (dropped by
        # _rewrap whenever the buffers they point into are replaced)
        self._decisions: dict = {}
        self._steps: dict = {}
        self._flush_plan = None
        self.plans, self.plan_reason = _launch.plan_support()
        # the residual copy of append as one prepared kernel launch (kernels_numba/append.py)
        # instead of two torch copies (verified on an H100: tests/test_kernels_append.py and the
        # plan tests of tests/test_gpu_runtime.py); OSCAR_APPEND_KERNEL=0: torch copies
        self.append_kernel = os.environ.get("OSCAR_APPEND_KERNEL", "1") != "0"
        self._warmed: set = set()
        self._warmed_shapes: set = set()
        self._groups: dict = {}  # (num_q_heads, q_len) -> launches per step (_head_groups)
        self._alloc(_round_up(max(capacity, r), r))

    # --- lengths -----------------------------------------------------------------------------
    def _row_lengths(self) -> np.ndarray:
        """Per-row total tokens for :class:`RowLengths` (read from the device when static:
        synchronizes)."""
        return self.lengths_host()

    def known_lengths(self):
        """The host mirror of the rows' lengths, or None while the device decides (static)."""
        return None if self.static else self.seq_lens

    def lengths_host(self) -> np.ndarray:
        """Per-row tokens (a copy); synchronizes when static (reads the device lengths)."""
        if self.static:
            host = self.lengths.cpu().numpy().astype(np.int64)
            return host[:, LEN_QUANTIZED] + host[:, LEN_RESIDUAL]
        return self.seq_lens.copy()

    def sync_lengths(self) -> np.ndarray:
        """Read the device lengths into the host mirror and leave static mode (synchronizes)."""
        self.seq_lens = self.lengths_host()
        self.static = False
        return self.seq_lens.copy()

    def _push_lengths(self, rows=slice(None)) -> None:
        """Copy the host mirror's packed / residual lengths of ``rows`` to the device (after a
        host-path append; a host-to-device copy, no synchronization beyond it)."""
        host = np.zeros((self.batch, 3), np.int32)
        host[:, 0] = self.quantized_lens
        host[:, 1] = self.residual_lens
        self.lengths[rows, LEN_QUANTIZED:].copy_(torch.from_numpy(host[rows]))

    def set_start(self, start) -> None:
        """Per-row first visible tokens for the next decode calls: None (all 0), a validated
        host int64 ``[batch]``, or a CUDA integer tensor ``[batch]`` (copied on the device,
        capturable; its values are not checked)."""
        if start is None:
            if self._start_set:
                self.lengths[:, LEN_START].zero_()
                self._start_set = False
            return
        col = self.lengths[:, LEN_START]
        if isinstance(start, torch.Tensor):
            col.copy_(start)
        else:
            col.copy_(torch.from_numpy(np.asarray(start, np.int32)))
        self._start_set = True

    # --- warm-up -----------------------------------------------------------------------------
    def warm(self, num_q_heads: int | None = None, q_lens=(1,), q_dtype: str | None = None):
        """Compile or load every kernel this cache's decode loop launches: the flush of one
        residual window and, given ``num_q_heads``, the decode kernels of each q_len (in
        ``q_dtype``, default the cache's dtype). Kernels come from the persistent kernel cache
        when they were compiled before on this machine."""
        with _Launch(self.device):
            _quant.quantize_kernels(self.config, self.head_dim, self.dtype, self.num_kv_heads,
                                    self.batch, prefill=False)
            if self.append_kernel and self.plans:
                _append._append_kernel(2 if self.dtype != "float32" else 4)
            _append._append_rows_kernel(2 if self.dtype != "float32" else 4,
                                        self.config.residual_length)
            _quant._quantize_kernel(_quant._quantize_key(
                self.config, self.head_dim, self.dtype, self.num_kv_heads,
                self.config.residual_length // self.config.key_group_size * self.batch,
                row_flush=True))
        if num_q_heads is not None:
            for q_len in q_lens:
                self._warm_decode(int(num_q_heads), int(q_len), q_dtype or self.dtype)

    def _head_groups(self, num_q_heads: int, q_len: int) -> int:
        """Launches per decode step (:func:`kernels_numba.attention.head_groups`): 1 unless
        the step has more query rows per KV head than a split kernel takes; ValueError when
        even one query head per KV head is too many (q_len too large)."""
        key = (num_q_heads, q_len)
        s = self._groups.get(key)
        if s is None:
            g = num_q_heads // self.num_kv_heads
            s = _attn.head_groups(self.config, self.head_dim, g, q_len)
            if s is None:
                raise ValueError(
                    f"q: q_len {q_len} is too many query rows per KV head for the decode kernels "
                    f"at head_dim {self.head_dim} even one query head at a time; use a smaller "
                    "q_len per call")
            self._groups[key] = s
        return s

    def _warm_decode(self, num_q_heads: int, q_len: int, q_dtype: str) -> None:
        key = (num_q_heads, q_len, q_dtype)
        if key in self._warmed:
            return
        s = self._head_groups(num_q_heads, q_len)
        if s > 1:  # the launches run over num_q_heads / s heads (_decode_in_head_groups)
            self._warm_decode(num_q_heads // s, q_len, q_dtype)
            self._warmed.add(key)
            return
        with _Launch(self.device):
            _attn.decode_kernels(self.config, self.head_dim, num_q_heads // self.num_kv_heads,
                                 q_len, q_dtype, self.dtype)
        self._warmed.add(key)

    # --- buffers -----------------------------------------------------------------------------
    def _shapes(self, cap):
        c, b, h, d = self.config, self.batch, self.num_kv_heads, self.head_dim
        s = 1 if c.norm_scope == "token" else h
        return dict(
            k_codes=((b, h, cap // 32, d * c.key_bits // 32, 32), torch.int32),
            k_params=((b, h, cap // c.key_group_size, d, 2), self._param_dtype),
            v_codes=((b, h, cap, d * c.value_bits // 32), torch.int32),
            v_params=((b, h, cap, d // c.value_group_size, 2), self._param_dtype),
            norms=((b, s, cap) if c.scale_tokens else (1, 1, 1), torch.float32),
        )

    @property
    def _param_dtype(self):
        return torch.float16 if self.config.param_dtype == "float16" else torch.float32

    def _alloc(self, cap: int) -> None:
        """(Re)allocate the packed buffers with room for ``cap`` tokens, keeping contents (the
        whole old capacity: the host mirror may be stale after device-decided appends)."""
        old = getattr(self, "buf", None)
        buf = {}
        for name, (shape, dt) in self._shapes(cap).items():
            t = torch.zeros(shape, dtype=dt, device=self.device)
            if old is not None and self.capacity and not (
                    name == "norms" and not self.config.scale_tokens):
                n = self._tokens_to_len(name, min(self.capacity, cap))
                t[:, :, :n].copy_(old[name][:, :, :n])
            buf[name] = t
        self.buf = buf
        self.capacity = cap
        self._rewrap()

    def _rewrap(self) -> None:
        """Rebuild the Numba views of the long-lived buffers after any of them was replaced
        (``self.buf[...]``, ``self.k_res``, ``self.v_res``, ``self.status``: growth, batch
        selection, a copy) and drop everything derived from the old ones: the cached query
        view, the decode workspaces (a copy must not share them), and the launch plans, which
        hold the old pointers. New containers, not cleared ones: a copy starts from a shallow
        copy of this store's attributes."""
        self.nb = {n: (_nb_u32(t) if n.endswith("codes") else cuda.as_cuda_array(t))
                   for n, t in self.buf.items()}
        self.k_res_nb, self.v_res_nb = _nb(self.k_res), _nb(self.v_res)
        self.status_nb = cuda.as_cuda_array(self.status)
        self.lengths_nb = cuda.as_cuda_array(self.lengths)
        self._q_cache = None
        self._dec_cache = {}
        self._row_plans = {}
        self._steps = {}
        self._flush_plan = None
        self._append_plans = {}

    def _plan_failed(self, exc) -> None:
        """Launch plans are not usable here: fall back to the dispatcher for this store."""
        self.plans, self.plan_reason = False, f"{type(exc).__name__}: {exc}"

    def _tokens_to_len(self, name, tokens):
        """Length along the token axis of array ``name`` for ``tokens`` tokens."""
        if name == "k_codes":
            return tokens // 32
        if name == "k_params":
            return tokens // self.config.key_group_size
        return tokens

    def reserve(self, seq_len: int) -> None:
        """Make room for ``seq_len`` quantized tokens without further reallocation."""
        need = _round_up(seq_len, self.config.residual_length)
        if need > self.capacity:
            self._alloc(need)

    def _ensure(self, tokens: int) -> None:
        if tokens > self.capacity:
            self._alloc(max(tokens, _round_up(2 * self.capacity, self.config.residual_length)))

    def _views(self, start: int, stop: int) -> dict:
        """Numba views of the packed buffers for tokens [start, stop)."""
        return self._row_views(slice(None), start, stop)

    # --- operations --------------------------------------------------------------------------
    def check_device(self, name, x) -> None:
        if not (isinstance(x, torch.Tensor) and x.is_cuda and x.device == self.device):
            where = x.device if isinstance(x, torch.Tensor) else "host (numpy)"
            raise ValueError(f"{name}: expected a CUDA tensor on {self.device} (the cache's "
                             f"device), got {where}")

    def _row_views(self, rows, start: int, stop: int) -> dict:
        """Numba views of the packed buffers of ``rows`` (a slice) for tokens [start, stop)."""
        out = {}
        for name, arr in self.nb.items():
            if name == "norms" and not self.config.scale_tokens:
                out[name] = arr
            else:
                a, b = self._tokens_to_len(name, start), self._tokens_to_len(name, stop)
                out[name] = arr[rows, :, a:b]
        return out

    def _launch_quantize(self, k, v, start, stream, rows=slice(None)) -> None:
        """One launch of the fused quantize kernel into tokens [start, start + n) of ``rows``."""
        views = self._row_views(rows, start, start + k.shape[2])
        _quant.quantize_block(_nb(_rows16(k)), _nb(_rows16(v)), views["k_codes"], views["k_params"],
                              views["v_codes"], views["v_params"], views["norms"],
                              self.status_nb, self.config, self.dtype, stream=stream)

    def _quantize_into(self, k, v, start: int) -> None:
        """Benchmark hook: re-quantize ``k, v`` into existing capacity at ``start`` (no state)."""
        with _Launch(self.device) as stream:
            self._launch_quantize(k, v, start, stream)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v [B, H, n, D]`` to every row, each at its own length.

        One token (a decode step): the append_rows kernel (the device reads and advances the
        lengths) and, when a row's window filled, the row-flush quantize kernel; prepared for a
        capture (``static``), the flush launch is always issued and decides per row on the
        device. More tokens: the host path (torch copies, host-decided quantize launches)."""
        if torch.cuda.current_device() != self.device.index:
            # launch plans launch in the current CUDA context: make it this device's (a model
            # spread over GPUs, device_map="auto", calls layers on several devices)
            with torch.cuda.device(self.device):
                return self.append(k, v)
        n = k.shape[2]
        if self.static:
            if n != 1:
                raise ValueError(f"k_new: a cache prepared for capture appends one token per row "
                                 f"per call ([batch, num_kv_heads, 1, head_dim]), got n={n}; call "
                                 "cache.sync_lengths() first for longer appends")
            self._append_device(k, v, flush=True)
            return
        if n == 1 and DEVICE_APPEND:
            r = self.config.residual_length
            # a row's window fills with this token (a few rows: Python beats NumPy reductions)
            fill = any(x % r == r - 1 for x in self.seq_lens.tolist())
            if fill:
                self._ensure(int(self.quantized_lens.max()) + r)
            self._append_device(k, v, flush=fill)
            self.seq_lens += 1
            return
        lens = self.seq_lens
        if (lens == lens[0]).all():
            self._append_host(slice(None), k, v)
        else:
            for b in range(self.batch):
                self._append_host(slice(b, b + 1), k[b : b + 1], v[b : b + 1])
        self._push_lengths()

    def fill_row(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v [1, H, n, D]`` to row ``row`` only (host path)."""
        if self.static:
            raise ValueError("row: fill_row on a cache prepared for capture: call "
                             "cache.sync_lengths() first (outside the captured step)")
        if torch.cuda.current_device() != self.device.index:
            with torch.cuda.device(self.device):
                return self.fill_row(row, k, v)
        self._append_host(slice(row, row + 1), k, v)
        self._push_lengths(slice(row, row + 1))

    def reset_rows(self, rows: np.ndarray) -> None:
        """Empty rows ``rows`` (validated): lengths 0 on the host and the device."""
        if self.static:
            raise ValueError("rows: reset_rows on a cache prepared for capture: call "
                             "cache.sync_lengths() first (outside the captured step)")
        self.seq_lens[rows] = 0
        index = torch.as_tensor(rows, dtype=torch.long).to(self.device)
        self.lengths.index_fill_(0, index, 0)

    def _append_host(self, rows, k: torch.Tensor, v: torch.Tensor) -> None:
        """The host-decided append of ``k, v [len(rows), H, n, D]`` to ``rows`` (a slice of rows
        of one length): residual copies, whole windows quantized by the host's launches."""
        r = self.config.residual_length
        first = rows.start or 0
        ql = int(self.quantized_lens[first])
        rl = int(self.residual_lens[first])
        n = k.shape[2]
        self._ensure(ql + (rl + n) // r * r)
        pos = 0
        with _Launch(self.device) as stream:
            if rl:
                take = min(r - rl, n)
                self.k_res[rows, :, rl : rl + take].copy_(k[:, :, :take])
                self.v_res[rows, :, rl : rl + take].copy_(v[:, :, :take])
                rl += take
                pos = take
                if rl == r:
                    self._launch_quantize(self.k_res[rows], self.v_res[rows], ql, stream, rows)
                    ql += r
                    rl = 0
            whole = (n - pos) // r * r
            if whole:
                self._launch_quantize(k[:, :, pos : pos + whole], v[:, :, pos : pos + whole], ql,
                                      stream, rows)
                ql += whole
                pos += whole
        rest = n - pos
        if rest:
            self.k_res[rows, :, :rest].copy_(k[:, :, pos:])
            self.v_res[rows, :, :rest].copy_(v[:, :, pos:])
            rl = rest
        self.seq_lens[rows] = ql + rl

    def _append_device(self, k: torch.Tensor, v: torch.Tensor, flush: bool) -> None:
        """append_rows (one token per row, the device advances the lengths) and, with ``flush``,
        the row-flush quantize launch (rows whose window filled pack it; the others exit)."""
        key = (k.shape, k.stride(), v.stride(), k.dtype)
        plan = self._row_plans.get(key)
        if plan is None:
            if len(self._row_plans) > 64:
                self._row_plans = {}
            plan = self._row_plans[key] = self._build_row_plan(k, v)
        (append, f_k, f_v), flush_launch = plan
        if append is None:  # no launch plans here: the dispatcher
            with _Launch(self.device) as st:
                _append.append_rows(_nb(k), _nb(v), self.k_res_nb, self.v_res_nb, self.lengths_nb,
                                    self.status_nb, self.capacity, stream=st)
                if flush:
                    _dispatch(*flush_launch[:3], st, *flush_launch[3])
            return
        stream = _launch.current_stream(self.device.index)
        f_k.value, f_v.value = k.data_ptr(), v.data_ptr()
        append.launch(stream)
        if flush:
            flush_launch.launch(stream)

    def _build_row_plan(self, k: torch.Tensor, v: torch.Tensor):
        """Prepared launches of append_rows (k_new, v_new patched per call) and of the row
        flush (fixed arguments: the residual windows, the whole capacity, the lengths)."""
        with _Launch(self.device):
            kernel, grid, block, args = _append.append_rows_launch(
                _nb(k), _nb(v), self.k_res_nb, self.v_res_nb, self.lengths_nb, self.status_nb,
                self.capacity)
            fl = _quant.quantize_launch(
                self.k_res_nb, self.v_res_nb, self.nb["k_codes"], self.nb["k_params"],
                self.nb["v_codes"], self.nb["v_params"], self.nb["norms"], self.status_nb,
                self.config, self.dtype, lengths=self.lengths_nb)
            if self.plans:
                try:
                    launch = _launch.PreparedLaunch(kernel, grid, block, args)
                    names = _append.APPEND_ROWS_ARGS
                    return ((launch, launch.pointer_field(names.index("k_new")),
                             launch.pointer_field(names.index("v_new"))),
                            _launch.PreparedLaunch(*fl))
                except _launch.PlanUnavailable as exc:
                    self._plan_failed(exc)
        return (None, None, None), fl

    def prepare_capture(self, max_seq_len: int, num_q_heads: int | None = None,
                        q_lens=(1,), q_dtype: str | None = None) -> None:
        """Reserve packed room for ``max_seq_len`` tokens per row, push the lengths, switch to
        device-decided appends and capacity-bound decode plans (``static``), and build the
        decode steps (workspaces and prepared launches) of every query shape warmed so far and
        of ``num_q_heads`` x ``q_lens`` in ``q_dtype``: a capture (torch.compile's CUDA graph
        trees included) then allocates nothing that outlives it but each step's output."""
        if num_q_heads is not None:  # a q_len the kernels cannot take raises before any change
            for q_len in q_lens:
                self._head_groups(int(num_q_heads), int(q_len))
        self.reserve(max_seq_len)
        if not self.static:
            self._push_lengths()
        self.static = True
        self._row_plans = {}
        if num_q_heads is not None:
            for q_len in q_lens:
                self._warm_decode(int(num_q_heads), int(q_len), q_dtype or self.dtype)
        for hq, q_len, qdt in sorted(self._warmed):
            if self._head_groups(hq, q_len) > 1:  # its head groups' shapes are warmed too
                continue
            q = torch.empty((self.batch, hq, q_len, self.head_dim), dtype=getattr(torch, qdt),
                            device=self.device)
            decision = self._decision(q)
            key = (q.shape, q.dtype, decision, False)
            if not self.plans:  # the dispatcher path: its workspaces only
                self._decode_buffers(q, decision[0])
            elif key not in self._steps:
                self._steps[key] = self._build_step(q, decision[0], False)

    def read_status(self) -> int:
        """Synchronize and return the status word (bit 1: non-finite, bit 2: fp16 overflow,
        bit 4: fp16 underflow, bit 8: a device append found no packed capacity left)."""
        return int(self.status.item())

    def residual(self):
        n = int(self.residual_lens.max(initial=0))
        return (self.k_res[:, :, :n], self.v_res[:, :, :n])

    def packed(self) -> PackedBlock:
        t = int(self.quantized_lens.max(initial=0))
        b = {name: self.buf[name][:, :, : self._tokens_to_len(name, t)] for name in self.buf}
        return PackedBlock(k_codes=b["k_codes"], k_params=b["k_params"], v_codes=b["v_codes"],
                           v_params=b["v_params"],
                           norms=b["norms"] if self.config.scale_tokens else None)

    def nbytes(self) -> int:
        """Bytes of the valid tokens of every row (packed and residual)."""
        per_tok = 0
        for name in ("k_codes", "k_params", "v_codes", "v_params", "norms"):
            if name == "norms" and not self.config.scale_tokens:
                continue
            t = self.buf[name]
            per_tok += t[0:1].numel() * t.element_size() / t.shape[2] \
                * self._tokens_to_len(name, self.config.residual_length) \
                / self.config.residual_length
        n = per_tok * float(self.quantized_lens.sum())
        res = self.k_res.shape[1] * self.k_res.shape[3] * self.k_res.element_size()
        return int(round(n)) + 2 * res * int(self.residual_lens.sum())

    def _decode_buffers(self, q: torch.Tensor, splits: int) -> dict:
        """Workspace tensors for this query shape, with their Numba views, and a scratch ``lse``
        for calls that do not return it.

        Reused across calls of the same shape (wrapping a tensor for Numba costs ~20 us). The
        output (and a returned ``lse``) is a fresh tensor per call, written by the merge kernel
        in q's dtype: no cast or copy kernel after the merge.
        """
        b, hq, q_len, d = q.shape
        key = (b, hq, q_len, d, splits)
        bufs = self._dec_cache.get(key)
        if bufs is None:
            lse = torch.empty((b, hq, q_len), dtype=torch.float32, device=self.device)
            ws = {}  # zeros: the split kernel's arrival counters must start at 0
            for n, sh in _attn.workspace_shapes(b, hq, q_len, d, splits).items():
                tdt = getattr(torch, np.dtype(_attn.WORKSPACE_DTYPES[n]).name)
                ws[n] = torch.zeros(sh, dtype=tdt, device=self.device)
            bufs = dict(lse=lse, lse_nb=cuda.as_cuda_array(lse),
                        ws_nb={n: cuda.as_cuda_array(t) for n, t in ws.items()}, ws=ws)
            self._dec_cache[key] = bufs
        return bufs

    def _q_view(self, q: torch.Tensor):
        """Numba view of q, cached for the last query buffer (decode loops reuse one buffer)."""
        key = (q.data_ptr(), tuple(q.shape), tuple(q.stride()), q.dtype)
        if self._q_cache is None or self._q_cache[0] != key:
            self._q_cache = (key, _nb(q), q)  # keep q alive while its view is cached
        return self._q_cache[1]

    def decode_attention(self, q: torch.Tensor, scale: float, return_lse: bool):
        if torch.cuda.current_device() != self.device.index:  # see append
            with torch.cuda.device(self.device):
                return self.decode_attention(q, scale, return_lse)
        groups = self._head_groups(int(q.shape[1]), int(q.shape[2]))
        if groups > 1:
            return self._decode_in_head_groups(q, scale, return_lse, groups)
        # the first step of a query shape loads or compiles every variant the loop can launch
        # (no compile later in the loop when the split plan changes)
        if (q.shape[1], q.shape[2], q.dtype) not in self._warmed_shapes:
            self._warm_decode(int(q.shape[1]), int(q.shape[2]), _dtype_name(q))
            self._warmed_shapes.add((q.shape[1], q.shape[2], q.dtype))
        if self.plans:
            try:
                return self._decode_planned(q, scale, return_lse)
            except _launch.PlanUnavailable as exc:
                self._plan_failed(exc)
        return self._decode_dispatched(q, scale, return_lse)

    def _decode_in_head_groups(self, q: torch.Tensor, scale: float, return_lse: bool,
                               groups: int):
        """A step with more query rows per KV head than a kernel takes, as ``groups`` decode
        steps over ``G / groups`` query heads of each KV head (each reads the packed cache:
        ``groups`` times the bytes; exact, as every row's attention is independent)."""
        b, hq, q_len, d = (int(x) for x in q.shape)
        h = self.num_kv_heads
        g = hq // h
        sub = q.reshape(b, h, groups, g // groups, q_len, d)
        outs, lses = [], []
        for j in range(groups):
            res = self.decode_attention(sub[:, :, j].reshape(b, h * (g // groups), q_len, d)
                                        .contiguous(),
                                        scale, return_lse)
            out, lse = res if return_lse else (res, None)
            outs.append(out.view(b, h, g // groups, q_len, d))
            if return_lse:
                lses.append(lse.view(b, h, g // groups, q_len))
        out = torch.stack(outs, dim=2).view(b, hq, q_len, d)
        if not return_lse:
            return out
        return out, torch.stack(lses, dim=2).view(b, hq, q_len)

    def _bounds(self):
        """Upper bounds of the rows' packed and residual tokens that size a decode step's plan:
        the longest row's (host mirror), or, prepared for a capture, the capacity and R - 1
        (any length the device may reach); the kernels read each row's own."""
        r = self.config.residual_length
        if self.static:
            return self.capacity, r - 1
        ls = self.seq_lens.tolist()  # a few rows: cheaper than NumPy reductions
        lo, hi = min(ls), max(ls)
        if lo == hi:  # rows of one length (the common case)
            return hi // r * r, hi % r
        return max(n // r * r for n in ls), max(n % r for n in ls)

    def _decision(self, q: torch.Tensor, bounds=None):
        """``(num_splits, residual_rows, fused)`` of a decode step of q's shape at the current
        length bounds (cached: they change only with the packed bound and whether residual
        tokens exist)."""
        ql, rl = self._bounds() if bounds is None else bounds
        key = (q.shape, q.dtype, ql, rl > 0)
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) > 4096:
                self._decisions.clear()
            b, hq, q_len, d = (int(x) for x in q.shape)
            qdt = _dtype_name(q)
            splits = _attn.plan_splits(self.config, b, self.num_kv_heads, d,
                                       hq // self.num_kv_heads, q_len, qdt, self.dtype,
                                       ql, rl, self._num_sms)
            skey = _attn._split_key(self.config, d, hq // self.num_kv_heads, q_len, qdt,
                                    self.dtype, qdt)
            decision = self._decisions[key] = (splits,) + _attn.launch_shape(
                skey, b, self.num_kv_heads, ql, rl, splits)
        return decision

    def _decode_planned(self, q: torch.Tensor, scale: float, return_lse: bool):
        """One decode step through prepared launches: patch q/out/lse pointers, lengths and
        scale, launch on torch's current stream. Bit-identical to the dispatcher path (same
        kernels, same packed parameters)."""
        bounds = self._bounds()  # once per step: the plan's decision and its patched lengths
        decision = self._decision(q, bounds)
        key = (q.shape, q.dtype, decision, return_lse)
        step = self._steps.get(key)
        if step is None:
            if len(self._steps) > 256:
                self._steps.clear()
            step = self._steps[key] = self._build_step(q, decision[0], return_lse)
        # q is on this device (checked); empty_like parses less than empty(shape, dtype, device)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = (torch.empty(q.shape[:3], dtype=torch.float32, device=self.device)
               if return_lse else None)
        qp, op = q.data_ptr(), out.data_ptr()
        lp = lse.data_ptr() if return_lse else None
        stream = _launch.current_stream(self.device.index)
        (ql, rl), sc = bounds, float(scale)
        for launch, f_q, f_out, f_lse, f_ql, f_rl, f_scale in step:
            f_q.value, f_out.value, f_ql.value, f_rl.value, f_scale.value = qp, op, ql, rl, sc
            if lp is not None:
                f_lse.value = lp
            launch.launch(stream)
        return (out, lse) if return_lse else out

    def _build_step(self, q: torch.Tensor, splits: int, return_lse: bool):
        """Prepared launches of one decode step shape (the kernels :func:`decode_launches`
        picks), each with the fields patched per call."""
        bufs = self._decode_buffers(q, splits)
        out = torch.empty(q.shape, dtype=q.dtype, device=self.device)
        lse_nb = (cuda.as_cuda_array(torch.empty(q.shape[:3], dtype=torch.float32,
                                                 device=self.device))
                  if return_lse else bufs["lse_nb"])
        step = []
        with _Launch(self.device):
            launches = _attn.decode_launches(
                _nb(q), self.nb["k_codes"], self.nb["k_params"], self.nb["v_codes"],
                self.nb["v_params"], self.nb["norms"], self.k_res_nb, self.v_res_nb, _nb(out),
                lse_nb, bufs["ws_nb"], self.config, 1.0, *self._bounds(),
                _dtype_name(q), self.dtype, splits, self.lengths_nb)
            for kernel, grid, block, args, names in launches:
                launch = _launch.PreparedLaunch(kernel, grid, block, args)
                step.append((launch, launch.pointer_field(names.index("q")),
                             launch.pointer_field(names.index("out")),
                             launch.pointer_field(names.index("lse")),
                             launch.field(names.index("quantized_len")),
                             launch.field(names.index("residual_len")),
                             launch.field(names.index("scale"))))
        return step

    def _decode_dispatched(self, q: torch.Tensor, scale: float, return_lse: bool):
        d, q_len = int(q.shape[3]), int(q.shape[2])
        ql, rl = self._bounds()
        splits = _attn.plan_splits(self.config, int(q.shape[0]), self.num_kv_heads, d,
                                   int(q.shape[1]) // self.num_kv_heads, q_len, _dtype_name(q),
                                   self.dtype, ql, rl, self._num_sms)
        bufs = self._decode_buffers(q, splits)
        out = torch.empty(q.shape, dtype=q.dtype, device=self.device)
        if return_lse:
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=self.device)
            lse_nb = cuda.as_cuda_array(lse)
        else:
            lse_nb = bufs["lse_nb"]
        with _Launch(self.device) as stream:
            _attn.decode_attention(
                self._q_view(q), self.nb["k_codes"], self.nb["k_params"], self.nb["v_codes"],
                self.nb["v_params"], self.nb["norms"], self.k_res_nb, self.v_res_nb,
                _nb(out), lse_nb, bufs["ws_nb"], self.config, scale,
                ql, rl, _dtype_name(q), self.dtype, splits, self.lengths_nb,
                stream=stream, check=False)
        return (out, lse) if return_lse else out

    def dequantize(self, out_dtype=None):
        b, h, d, t = self.batch, self.num_kv_heads, self.head_dim, self.quantized_len  # uniform
        k_hat = torch.empty((b, h, t, d), dtype=torch.float32, device=self.device)
        v_hat = torch.empty_like(k_hat)
        if t:
            views = self._views(0, t)
            with _Launch(self.device) as stream:
                _deq.dequantize_block(views["k_codes"], views["k_params"], views["v_codes"],
                                      views["v_params"], views["norms"],
                                      cuda.as_cuda_array(k_hat), cuda.as_cuda_array(v_hat),
                                      self.config, stream=stream)
        k_res, v_res = self.residual()
        tdt = _TORCH_DTYPE[out_dtype or self.dtype]
        return (torch.cat((k_hat.to(tdt), k_res.to(tdt)), dim=2),
                torch.cat((v_hat.to(tdt), v_res.to(tdt)), dim=2))

    # --- batch and length edits, copies, loading (beam search, crop, save/load) ----------------
    def select_batch(self, idx: np.ndarray) -> None:
        """Rows ``idx`` (validated host int64) of every buffer: one ``index_select`` each."""
        index = torch.as_tensor(idx, dtype=torch.long).to(self.device)
        for name, t in list(self.buf.items()):
            if name == "norms" and not self.config.scale_tokens:
                continue  # a (1, 1, 1) placeholder, not per row
            self.buf[name] = t.index_select(0, index)
        self.k_res = self.k_res.index_select(0, index)
        self.v_res = self.v_res.index_select(0, index)
        if self.static:
            self.sync_lengths()
        self.lengths = self.lengths.index_select(0, index)
        self.seq_lens = self.seq_lens[idx]
        self.batch = int(index.numel())
        self._rewrap()

    def truncate(self, seq_len: int) -> None:
        """Drop residual tokens after ``seq_len`` (validated: ``quantized_len <= seq_len``)."""
        self.seq_lens[:] = seq_len
        self._push_lengths()

    def __deepcopy__(self, memo):
        """Clone every buffer (same device, same capacity) and rewrap; plain attributes are
        shared (they are immutable: config, device, sizes)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.buf = {n: t.clone() for n, t in self.buf.items()}
        new.k_res, new.v_res = self.k_res.clone(), self.v_res.clone()
        new.status = self.status.clone()
        new.lengths = self.lengths.clone()
        new.seq_lens = self.seq_lens.copy()
        new._rewrap()
        memo[id(self)] = new
        return new

    def load_state(self, packed: dict, k_res: np.ndarray, v_res: np.ndarray,
                   quantized_len: int) -> None:
        """Install validated host arrays (``PackedBlock.arrays()`` names; codes uint32,
        residual ``[B, H, residual_len, D]`` float) into the buffers, in place."""
        self.reserve(quantized_len)
        for name, a in packed.items():
            if name.endswith("codes"):
                a = np.ascontiguousarray(a).view(np.int32)
            n = self._tokens_to_len(name, quantized_len)
            self.buf[name][:, :, :n].copy_(torch.from_numpy(np.ascontiguousarray(a)))
        r = k_res.shape[2]
        tdt = _TORCH_DTYPE[self.dtype]
        self.k_res[:, :, :r].copy_(torch.from_numpy(np.ascontiguousarray(k_res)).to(tdt))
        self.v_res[:, :, :r].copy_(torch.from_numpy(np.ascontiguousarray(v_res)).to(tdt))
        self.seq_lens[:] = quantized_len + r
        self._push_lengths()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def empty(batch: int, num_kv_heads: int, head_dim: int, dtype: str, config: OScaRConfig,
          device, max_seq_len: int | None = None, num_q_heads: int | None = None):
    """An empty Numba-backed cache on a CUDA device, its kernels warmed (:meth:`NumbaStore.warm`)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: expected a CUDA device for backend='numba', got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    store = NumbaStore(batch, num_kv_heads, head_dim, dtype, config, device,
                       capacity=initial_capacity(0, config.residual_length, max_seq_len))
    store.warm(num_q_heads)
    return QuantizedKVCache(store, batch, num_kv_heads, head_dim, dtype, config, device=str(device))


def quantize_kv(k: torch.Tensor, v: torch.Tensor, config: OScaRConfig,
                max_seq_len: int | None = None, num_q_heads: int | None = None) -> QuantizedKVCache:
    """Quantize CUDA tensors (validated by the caller) into a Numba-backed cache.

    Synchronizes once at the end to raise ValueError on NaN/Inf inputs or float16 overflow.
    Warms the kernels of the cache's decode loop first (:meth:`NumbaStore.warm`).
    """
    b, h, t, d = k.shape
    dt = _dtype_name(k)
    r = config.residual_length
    store = NumbaStore(b, h, d, dt, config, k.device,
                       capacity=initial_capacity(t, r, max_seq_len))
    store.warm(num_q_heads)
    cache = QuantizedKVCache(store, b, h, d, dt, config, device=str(k.device))
    if t:
        store.append(k, v)
        check_prefill(store)
    return cache


def check_prefill(store: NumbaStore) -> None:
    """ValueError for NaN/Inf or float16 range events of a prefill: one synchronization for the
    kernel's status word and the residual tokens' finiteness together."""
    n = int(store.residual_lens.max(initial=0))
    res_bad = ~(torch.isfinite(store.k_res[:, :, :n]).all()
                & torch.isfinite(store.v_res[:, :, :n]).all())
    status = int((store.status[0] | res_bad.to(torch.int32) * STATUS_NONFINITE).item())
    if status & STATUS_NONFINITE:
        raise ValueError("k, v: expected finite values, got NaN or Inf")
    if status & STATUS_FP16_OVERFLOW:
        raise ValueError("k, v: a quantization group has min/max/scale outside the float16 "
                         "range of param_dtype='float16'; use param_dtype='float32'")
    if status & STATUS_FP16_UNDERFLOW:
        raise ValueError("k, v: a quantization group is not constant but all its values are "
                         "below 6.1e-05 in magnitude, where param_dtype='float16' stores its "
                         "scale and min as subnormals or zeros; use param_dtype='float32'")


def decode_attention(q, cache: QuantizedKVCache, scale: float, return_lse: bool, start=None):
    """``start``: None, a validated host int64 ``[batch]`` or a CUDA integer tensor."""
    cache._store.check_device("q", q)
    if not q.is_contiguous():  # the kernel reads q row-major; a strided view is copied once
        q = q.contiguous()
    store = cache._store
    if start is not None or store._start_set:  # else nothing to write (no device switch)
        with torch.cuda.device(store.device):
            store.set_start(start)
    return store.decode_attention(q, scale, return_lse)


def dequantize_kv(cache: QuantizedKVCache, dtype: str | None = None):
    return cache._store.dequantize(dtype)
