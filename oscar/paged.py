"""A paged OScaR cache: packed pages in a pool, block tables, vLLM-style slot mapping.

The layout serving engines expect (docs/serving.md). One :class:`PagedKVCache` holds one
layer's pages for many sequences:

* **Pages.** A pool of ``num_pages`` pages, sized once. A page holds ``page_size`` (P)
  consecutive tokens of one sequence in packed form, self-contained: codes, key/value params and
  token norms in one run of ``layout.page_bytes`` bytes (``oscar.reference.paged``). P is a
  multiple of 32 and of ``key_group_size``; key groups are aligned to absolute token positions,
  so a full page can be shared between sequences (prefix caching) and its bytes are those of the
  contiguous cache on the same tokens.
* **Allocation.** :meth:`allocate` / :meth:`retain` / :meth:`free` keep a reference count per
  page; exhausting the pool is a ValueError at allocation. An engine with its own block manager
  may use its own page ids instead; writes still check that a page is allocated here and owned
  by one sequence (refcount 1), so nothing is ever written out of bounds or into a shared page.
* **Sequence slots.** ``max_seqs`` slots, each with its lengths and its residual window: the last
  ``seq_len - quantized_len`` tokens stay unquantized *outside* the pages, in
  ``[max_seqs, num_kv_heads, residual_length, head_dim]``, with the slot mapping of each token.
  When a window holds ``residual_length`` tokens it is quantized and written into the pages
  its tokens' slots name. :meth:`reset` starts a sequence in a slot (optionally after a shared
  prefix of ``cached_len`` tokens in full pages).
* **Writing** (:meth:`write`): new tokens ``k, v [num_tokens, num_kv_heads, head_dim]`` (vLLM's
  flattened layout), ``slot_mapping`` int64 ``[num_tokens]`` (``page * P + offset``; -1 =
  padding, skipped) and ``seq_ids`` ``[num_tokens]`` (each token's sequence slot; a sequence's
  tokens in order).
* **Reading** (:meth:`decode_attention`): queries ``[num_seqs, num_q_heads, q_len, head_dim]``
  through ``block_table`` int32 ``[num_seqs, max_blocks]``; rows may have different lengths.

Backends: ``"reference"`` (NumPy, the oracle) and ``"numba"`` (CUDA; oscar/_paged_cuda.py, whose
decode is an interim path: docs/serving.md).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _validate as V
from .config import OScaRConfig
from .reference.attention import decode_attention as _ref_decode_attention
from .reference.block import PackedBlock, check_residual_tokens, quantize_block
from .reference.pack import TILE_TOKENS
from .reference.paged import PageLayout, gather_pages, page_layout, write_pages
from .reference.paged import slot_mapping as _slot_mapping

#: Marks a padding token in a slot mapping (vLLM's PAD_SLOT_ID): the token is not written.
PAD_SLOT = -1

_NUMPY_RESIDUAL_DTYPE = {"float16": np.float16, "float32": np.float32, "bfloat16": np.float32}


def _pos_int(name, val, minimum=1):
    if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer)) \
            or val < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name}: expected a {kind} int, got {val!r}")
    return int(val)


def _int_vector(name, x, length=None, what="int array"):
    """``x`` (NumPy array, list, or torch tensor on any device) as a host int64 NumPy vector."""
    if V.is_torch(x):
        x = x.detach().cpu().numpy()
    elif isinstance(x, (list, tuple)):
        x = np.asarray(x, dtype=np.int64) if len(x) else np.zeros(0, np.int64)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected an {what}, got {type(x).__name__}")
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")
    if x.ndim != 1 or (length is not None and x.shape[0] != length):
        want = "[n]" if length is None else f"[{length}]"
        raise ValueError(f"{name}: expected shape {want}, got {x.shape}")
    return x.astype(np.int64)


class SeqWrite(NamedTuple):
    """One sequence's share of a :meth:`PagedKVCache.write` (validated by the host)."""

    seq: int  #: sequence slot
    idx: np.ndarray  #: indices of its new tokens in the write, in order
    held: int  #: tokens in its residual window before the write
    windows: int  #: complete windows to quantize (of the held tokens, then the new ones)
    flush_slots: np.ndarray  #: int64 [windows * residual_length]: slots of those tokens
    pages: np.ndarray  #: the pages its held and new tokens go to


def slot_mapping(block_table_row, positions, page_size: int) -> np.ndarray:
    """vLLM's slot mapping of token ``positions`` of one sequence with block-table row
    ``block_table_row``: int64 ``row[pos // page_size] * page_size + pos % page_size``."""
    return _slot_mapping(block_table_row, positions, page_size)


class PagedKVCache:
    """Packed pages of one attention layer for many sequences (see the module docstring).

    Build with :meth:`empty`. Attributes: ``config``, ``num_pages``, ``page_size``,
    ``num_kv_heads``, ``head_dim``, ``max_seqs``, ``dtype``, ``backend``, ``layout``
    (:class:`oscar.reference.paged.PageLayout`: bytes per page and where each array sits).
    """

    def __init__(self, store, layout: PageLayout, num_pages, max_seqs, dtype, config, device):
        self._store = store
        self.layout = layout
        self.config = config
        self.num_pages = num_pages
        self.page_size = layout.page_size
        self.num_kv_heads = layout.num_kv_heads
        self.head_dim = layout.head_dim
        self.max_seqs = max_seqs
        self.dtype = dtype
        self.device = device
        self._refcount = np.zeros(num_pages, np.int32)
        # the sequence slot whose tokens a page holds (-1: none yet): two sequences' tokens in
        # one page is an engine error, caught before it corrupts either
        self._owner = np.full(num_pages, -1, np.int64)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: lowest ids first
        self._quantized = np.zeros(max_seqs, np.int64)
        self._residual = np.zeros(max_seqs, np.int64)
        self._res_slots = np.full((max_seqs, config.residual_length), PAD_SLOT, np.int64)

    @classmethod
    def empty(cls, num_pages, page_size, num_kv_heads, head_dim, max_seqs, dtype="float32",
              config=None, backend="reference", device=None, pool=None) -> "PagedKVCache":
        """An empty paged cache: a pool of ``num_pages`` pages of ``page_size`` tokens and
        ``max_seqs`` sequence slots, on the host (``backend="reference"``) or on a CUDA device
        (``backend="numba"``, ``device`` e.g. ``"cuda"``).

        ``pool``: optional storage to use instead of a new one, uint8 ``[num_pages,
        layout.page_bytes]`` C-contiguous (a NumPy array on the host and under the CUDA
        simulator, a torch CUDA tensor on the cache's device): the buffer a serving engine
        allocates for the layer (docs/serving.md). Its contents need not be zero.
        """
        config = OScaRConfig() if config is None else config
        if not isinstance(config, OScaRConfig):
            raise TypeError(f"config: expected OScaRConfig, got {type(config).__name__}")
        num_pages = _pos_int("num_pages", num_pages)
        page_size = _pos_int("page_size", page_size)
        unit = max(TILE_TOKENS, config.key_group_size)
        if page_size % unit:
            raise ValueError(f"page_size: expected a multiple of {unit} (the 32-token tile and "
                             f"key_group_size={config.key_group_size}), got {page_size}")
        num_kv_heads = _pos_int("num_kv_heads", num_kv_heads)
        max_seqs = _pos_int("max_seqs", max_seqs)
        config.check_head_dim(head_dim)
        if dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of {V.FLOAT_DTYPES}, got {dtype!r}")
        layout = page_layout(config, page_size, num_kv_heads, head_dim)
        if pool is not None:
            V.check_array("pool", pool)
            want = (num_pages, layout.page_bytes)
            contiguous = pool.is_contiguous() if V.is_torch(pool) else pool.flags["C_CONTIGUOUS"]
            if tuple(pool.shape) != want or V.dtype_name(pool) != "uint8" or not contiguous:
                raise ValueError(f"pool: expected a C-contiguous uint8 array of shape "
                                 f"[num_pages, page_bytes] = {list(want)}, got "
                                 f"{V.dtype_name(pool)} {tuple(pool.shape)}"
                                 + ("" if contiguous else " (not contiguous)"))
        if backend == "numba":
            from . import _paged_cuda

            store = _paged_cuda.PagedNumbaStore(layout, num_pages, max_seqs, dtype, config,
                                                device, pool)
            return cls(store, layout, num_pages, max_seqs, dtype, config, store.device)
        if backend != "reference":
            raise ValueError(f"backend: expected 'reference' or 'numba', got {backend!r}")
        if device is not None and str(device) != "cpu":
            raise ValueError(f"device: expected None or 'cpu' for backend='reference', "
                             f"got {device!r}")
        if pool is not None and not isinstance(pool, np.ndarray):
            raise TypeError(f"pool: expected a numpy.ndarray for backend='reference', got "
                            f"{type(pool).__name__}")
        store = PagedReferenceStore(layout, num_pages, max_seqs, dtype, config, pool)
        return cls(store, layout, num_pages, max_seqs, dtype, config, "cpu")

    @property
    def backend(self) -> str:
        return self._store.backend

    # --- pages -------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        """How many holders page ``page`` has (0 = free)."""
        return int(self._refcount[self._check_pages("page", [page])[0]])

    def allocate(self, n: int) -> np.ndarray:
        """``n`` free pages (int32 ids, reference count 1). ValueError, nothing allocated, when
        the pool has fewer than ``n`` free pages."""
        n = _pos_int("n", n, minimum=0)
        if n > len(self._free):
            raise ValueError(f"n: the page pool is exhausted: requested {n} pages, "
                             f"{len(self._free)} of {self.num_pages} free")
        pages = np.array([self._free.pop() for _ in range(n)], np.int32)
        self._refcount[pages] = 1
        return pages

    def _check_pages(self, name, pages, allocated=False):
        pages = _int_vector(name, np.atleast_1d(np.asarray(pages)) if not V.is_torch(pages)
                            else pages.reshape(-1))
        bad = (pages < 0) | (pages >= self.num_pages)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name}: expected page ids in [0, {self.num_pages}), got "
                             f"{int(pages[i])} at index {i}")
        if allocated:
            counts = np.bincount(pages, minlength=self.num_pages)
            short = counts > self._refcount
            if short.any():
                p = int(np.argmax(short))
                raise ValueError(f"{name}: expected allocated pages, got page {p} "
                                 f"{int(counts[p])} times with reference count "
                                 f"{int(self._refcount[p])}")
        return pages

    def retain(self, pages) -> None:
        """One more holder of each of ``pages`` (allocated): a second sequence that shares them
        (prefix caching). Each holder calls :meth:`free` once."""
        pages = self._check_pages("pages", pages)
        free = self._refcount[pages] == 0
        if free.any():
            raise ValueError(f"pages: expected allocated pages, got free page "
                             f"{int(pages[np.argmax(free)])}")
        np.add.at(self._refcount, pages, 1)

    def free(self, pages) -> None:
        """Drop one holder of each of ``pages``; a page whose count reaches 0 returns to the pool
        (its bytes stay until it is written again)."""
        pages = self._check_pages("pages", pages, allocated=True)
        np.subtract.at(self._refcount, pages, 1)
        for p in np.unique(pages):
            if self._refcount[p] == 0:
                self._free.append(int(p))
                self._owner[p] = -1

    # --- sequences ---------------------------------------------------------------------------
    def _check_seq(self, name, seq):
        seq = _pos_int(name, seq, minimum=0)
        if seq >= self.max_seqs:
            raise ValueError(f"{name}: expected a sequence slot in [0, {self.max_seqs}), "
                             f"got {seq}")
        return seq

    def reset(self, seq_id: int, cached_len: int = 0) -> "PagedKVCache":
        """Start a sequence in slot ``seq_id``: empty residual window, and ``cached_len`` tokens
        (a multiple of ``page_size``, default 0) already quantized in the full pages its block
        table starts with (a shared prefix: the caller :meth:`retain` s those pages)."""
        seq_id = self._check_seq("seq_id", seq_id)
        cached_len = _pos_int("cached_len", cached_len, minimum=0)
        if cached_len % self.page_size:
            raise ValueError(f"cached_len: expected a multiple of page_size ({self.page_size}): "
                             f"only full pages are shared, got {cached_len}")
        self._quantized[seq_id] = cached_len
        self._residual[seq_id] = 0
        self._res_slots[seq_id] = PAD_SLOT
        self._store.set_lengths(self._quantized, self._residual)
        return self

    def seq_len(self, seq_id: int) -> int:
        s = self._check_seq("seq_id", seq_id)
        return int(self._quantized[s] + self._residual[s])

    def quantized_len(self, seq_id: int) -> int:
        return int(self._quantized[self._check_seq("seq_id", seq_id)])

    def residual_len(self, seq_id: int) -> int:
        return int(self._residual[self._check_seq("seq_id", seq_id)])

    @property
    def seq_lens(self) -> np.ndarray:
        """int32 ``[max_seqs]`` tokens per sequence slot (host copy)."""
        return (self._quantized + self._residual).astype(np.int32)

    # --- writing -----------------------------------------------------------------------------
    def write(self, k, v, slot_mapping, seq_ids) -> "PagedKVCache":
        """Append new tokens ``k, v [num_tokens, num_kv_heads, head_dim]`` to their sequences.

        ``slot_mapping`` (int64 ``[num_tokens]``): where each token's packed form goes, page *
        page_size + offset, with offset = the token's position % page_size; -1 skips the token.
        ``seq_ids`` (int ``[num_tokens]``): each token's sequence slot; the tokens of one
        sequence come in order and follow its current length. A token's page must be allocated
        and not shared. Windows that fill are quantized into the pages. Raises ValueError /
        TypeError with nothing written when any of this does not hold (and, on the reference
        backend, for values the quantizer cannot store: NaN/Inf, float16 range).
        """
        name_k, name_v = "k", "v"
        for name, x in ((name_k, k), (name_v, v)):
            V.check_array(name, x)
            if len(x.shape) != 3:
                raise ValueError(f"{name}: expected a 3-D array [num_tokens, num_kv_heads, "
                                 f"head_dim], got shape {tuple(x.shape)}")
        n = int(k.shape[0])
        want = (n, self.num_kv_heads, self.head_dim)
        for name, x in ((name_k, k), (name_v, v)):
            if tuple(x.shape) != want:
                raise ValueError(f"{name}: expected shape [num_tokens, num_kv_heads, head_dim] = "
                                 f"{list(want)}, got {tuple(x.shape)}")
            dt = V.dtype_name(x)
            if dt != self.dtype:
                raise TypeError(f"{name}: expected dtype {self.dtype} (the cache's), got {dt}")
        self._store.check_device(name_k, k)
        self._store.check_device(name_v, v)
        slots = _int_vector("slot_mapping", slot_mapping, n)
        seqs = _int_vector("seq_ids", seq_ids, n)
        live = slots != PAD_SLOT
        total = self.num_pages * self.page_size
        bad = live & ((slots < 0) | (slots >= total))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"slot_mapping: expected -1 or a slot in [0, num_pages * page_size "
                             f"= {total}), got {int(slots[i])} at index {i}")
        bad = live & ((seqs < 0) | (seqs >= self.max_seqs))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"seq_ids: expected sequence slots in [0, {self.max_seqs}), got "
                             f"{int(seqs[i])} at index {i}")
        plan = self._plan_write(slots, seqs, live)
        self._store.write(k, v, plan)  # raises before changing anything (reference) or flags
        r = self.config.residual_length
        for s, idx, held, windows, _, pages in plan:
            self._owner[pages] = s
            seq_slots = np.concatenate((self._res_slots[s, :held], slots[idx]))
            rest = seq_slots[windows * r:]
            self._quantized[s] += windows * r
            self._residual[s] = len(rest)
            self._res_slots[s] = PAD_SLOT
            self._res_slots[s, : len(rest)] = rest
        self._store.set_lengths(self._quantized, self._residual)
        return self

    def _plan_write(self, slots, seqs, live):
        """Check the slots of every sequence's new tokens; returns ``[SeqWrite]``."""
        p, r = self.page_size, self.config.residual_length
        plan = []
        for s in np.unique(seqs[live]):
            s = int(s)
            idx = np.flatnonzero(live & (seqs == s))
            first = int(self._quantized[s] + self._residual[s])
            pos = first + np.arange(len(idx))
            off = slots[idx] % p
            wrong = off != pos % p
            if wrong.any():
                j = int(np.argmax(wrong))
                raise ValueError(
                    f"slot_mapping: expected the token at position {int(pos[j])} of sequence {s} "
                    f"at offset {int(pos[j] % p)} of its page (position % page_size), got slot "
                    f"{int(slots[idx[j]])} (offset {int(off[j])}) at index {int(idx[j])}")
            held = self._res_slots[s, : self._residual[s]]
            all_slots = np.concatenate((held, slots[idx]))
            all_pos = np.arange(int(self._quantized[s]), first + len(idx))
            page = all_slots // p
            same_run = all_pos[1:] // p == all_pos[:-1] // p
            split = same_run & (page[1:] != page[:-1])
            if split.any():
                j = int(np.argmax(split)) + 1
                raise ValueError(
                    f"slot_mapping: expected the tokens of one page run of sequence {s} in one "
                    f"page, got position {int(all_pos[j])} in page {int(page[j])} after "
                    f"position {int(all_pos[j - 1])} in page {int(page[j - 1])}")
            owned = self._refcount[page] == 1
            if not owned.all():
                j = int(np.argmin(owned))
                state = "free" if self._refcount[page[j]] == 0 else "shared (read-only)"
                raise ValueError(
                    f"slot_mapping: expected pages allocated to one sequence, got page "
                    f"{int(page[j])} ({state}) for position {int(all_pos[j])} of sequence {s}")
            other = (self._owner[page] != -1) & (self._owner[page] != s)
            for t in plan:  # pages taken by sequences earlier in this write
                other |= np.isin(page, t.pages) & (t.seq != s)
            if other.any():
                j = int(np.argmax(other))
                raise ValueError(
                    f"slot_mapping: expected each page to hold one sequence's tokens, got page "
                    f"{int(page[j])} for position {int(all_pos[j])} of sequence {s}, which "
                    f"holds tokens of another sequence")
            windows = len(all_slots) // r
            plan.append(SeqWrite(s, idx, int(self._residual[s]), windows,
                                 all_slots[: windows * r], np.unique(page)))
        return plan

    # --- reading -----------------------------------------------------------------------------
    def _rows(self, block_table, seq_ids, num_seqs):
        """Validated ``[(seq, pages, quantized_len, residual_len)]`` of each query row."""
        if V.is_torch(block_table):
            bt = block_table.detach().cpu().numpy()
        else:
            bt = block_table
        if not isinstance(bt, np.ndarray):
            raise TypeError(f"block_table: expected an int32 array [num_seqs, max_blocks], got "
                            f"{type(block_table).__name__}")
        if bt.dtype != np.int32:
            raise TypeError(f"block_table: expected dtype int32, got {bt.dtype}")
        if bt.ndim != 2 or bt.shape[0] != num_seqs:
            raise ValueError(f"block_table: expected shape [num_seqs = {num_seqs}, max_blocks], "
                             f"got {bt.shape}")
        if seq_ids is None:
            if num_seqs > self.max_seqs:
                raise ValueError(f"seq_ids: expected one per row when num_seqs ({num_seqs}) > "
                                 f"max_seqs ({self.max_seqs}), got None")
            seqs = np.arange(num_seqs)
        else:
            seqs = _int_vector("seq_ids", seq_ids, num_seqs)
            bad = (seqs < 0) | (seqs >= self.max_seqs)
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"seq_ids: expected sequence slots in [0, {self.max_seqs}), "
                                 f"got {int(seqs[i])} at index {i}")
        rows = []
        for i, s in enumerate(seqs):
            ql, rl = int(self._quantized[s]), int(self._residual[s])
            need = -(-ql // self.page_size)
            if need > bt.shape[1]:
                raise ValueError(f"block_table: expected at least {need} blocks in row {i} "
                                 f"(sequence {int(s)} has {ql} quantized tokens), got "
                                 f"{bt.shape[1]}")
            pages = bt[i, :need].astype(np.int64)
            bad = (pages < 0) | (pages >= self.num_pages)
            bad |= ~bad & (self._refcount[np.clip(pages, 0, self.num_pages - 1)] == 0)
            if bad.any():
                j = int(np.argmax(bad))
                raise ValueError(f"block_table: expected allocated pages in [0, "
                                 f"{self.num_pages}), got {int(pages[j])} at [{i}, {j}]")
            rows.append((int(s), pages, ql, rl))
        return rows

    def decode_attention(self, q, block_table, seq_ids=None, scale=None, return_lse=False):
        """Attention of ``q [num_seqs, num_q_heads, q_len, head_dim]`` over each row's sequence.

        Row i reads sequence slot ``seq_ids[i]`` (default: i) through ``block_table[i]``
        (int32 ``[num_seqs, max_blocks]``; the first ``ceil(quantized_len / page_size)``
        entries are read). GQA; with q_len > 1 the queries are the last q_len tokens of each
        row's sequence (causal). Returns ``out`` in q's dtype and container (and the float32
        ``lse [num_seqs, num_q_heads, q_len]``).
        """
        from .api import _check_scale

        shape = V.check_rank4("q", q, "num_seqs, num_q_heads, q_len, head_dim")
        dt = V.check_float_dtype("q", q)
        b, hq, q_len, d = shape
        if d != self.head_dim or hq % self.num_kv_heads:
            raise ValueError(f"q: expected shape [num_seqs, a multiple of num_kv_heads "
                             f"({self.num_kv_heads}), q_len, {self.head_dim}], got {shape}")
        scale = _check_scale(scale, d)
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
        self._store.check_device("q", q)
        rows = self._rows(block_table, seq_ids, b)
        for i, (s, _p, ql, rl) in enumerate(rows):
            if not 1 <= q_len <= ql + rl:
                raise ValueError(f"q: expected 1 <= q_len <= seq_len of row {i} (sequence {s}: "
                                 f"{ql + rl} tokens), got q_len={q_len}")
        out, lse = self._store.decode(q, rows, scale, dt)
        return (out, lse) if return_lse else out

    # --- inspection --------------------------------------------------------------------------
    def packed(self, block_table_row, seq_id: int) -> PackedBlock:
        """The quantized tokens of sequence ``seq_id`` read through ``block_table_row``, as a
        contiguous NumPy ``PackedBlock`` of batch 1 (the arrays of docs/format.md)."""
        s = self._check_seq("seq_id", seq_id)
        row = block_table_row
        if V.is_torch(row):
            row = row.detach().cpu().numpy()
        row = np.asarray(row, np.int32)[None]
        (_, pages, ql, _), = self._rows(row, [s], 1)
        return self._store.gather(pages, ql)

    def residual(self, seq_id: int):
        """``k, v`` float32 NumPy ``[1, num_kv_heads, residual_len, head_dim]`` of a sequence."""
        s = self._check_seq("seq_id", seq_id)
        return self._store.residual(s, int(self._residual[s]))

    def check(self) -> "PagedKVCache":
        """Raise ValueError if a flush met values it could not store (CUDA; the reference
        raises in :meth:`write`)."""
        status = self._store.read_status()
        if status:
            raise ValueError(f"cache: a flush met NaN/Inf or values outside the float16 range "
                             f"(status {status:#x}); the affected groups hold NaN parameters")
        return self


class PagedReferenceStore:
    """Pages and residual windows of the reference backend (NumPy on the host)."""

    backend = "reference"

    def __init__(self, layout: PageLayout, num_pages, max_seqs, dtype, config, pool=None):
        self.layout, self.config, self.dtype = layout, config, dtype
        self.pool = np.zeros((num_pages, layout.page_bytes), np.uint8) if pool is None else pool
        self.views = layout.views(self.pool)
        shape = (max_seqs, layout.num_kv_heads, config.residual_length, layout.head_dim)
        rdt = _NUMPY_RESIDUAL_DTYPE[dtype]
        self.k_res = np.zeros(shape, rdt)
        self.v_res = np.zeros(shape, rdt)

    def check_device(self, name, x) -> None:
        if V.is_torch(x) and x.is_cuda:
            raise ValueError(f"{name}: expected a CPU tensor or NumPy array for a "
                             f"reference-backend cache, got a tensor on {x.device}")

    def set_lengths(self, quantized, residual) -> None:
        """Host lengths are the cache's own (the CUDA store mirrors them on the device)."""

    def write(self, k, v, plan) -> None:
        """Everything is computed (and every error raised) before anything is stored."""
        k32, v32 = V.to_numpy_f32(k), V.to_numpy_f32(v)
        V.check_finite("k", k32)
        V.check_finite("v", v32)
        rdt = self.k_res.dtype
        k32 = k32.astype(rdt).astype(np.float32)  # rounded to the residual dtype, as stored
        v32 = v32.astype(rdt).astype(np.float32)
        r = self.config.residual_length
        commits = []
        for w in plan:
            # [1, H, held + n, D]: the window's tokens so far, then the new ones
            kk = np.concatenate((self.k_res[w.seq, :, : w.held].astype(np.float32),
                                 k32[w.idx].transpose(1, 0, 2)), axis=1)[None]
            vv = np.concatenate((self.v_res[w.seq, :, : w.held].astype(np.float32),
                                 v32[w.idx].transpose(1, 0, 2)), axis=1)[None]
            q = w.windows * r
            block = quantize_block(kk[:, :, :q], vv[:, :, :q], self.config) if q else None
            # tokens that stay: checked against what their flush will need (as the contiguous
            # cache's append does), so that no later flush can fail
            before = max(q, w.held)
            check_residual_tokens(kk[:, :, q:before], kk[:, :, before:], vv[:, :, before:],
                                  self.config)
            commits.append((w, block, kk[0, :, q:], vv[0, :, q:]))
        for w, block, k_rest, v_rest in commits:
            if block is not None:
                write_pages(self.views, self.layout, block, w.flush_slots)
            n = k_rest.shape[1]
            self.k_res[w.seq, :, :n] = k_rest
            self.v_res[w.seq, :, :n] = v_rest

    def gather(self, pages, quantized_len) -> PackedBlock:
        return gather_pages(self.views, self.layout, pages, quantized_len)

    def residual(self, s, n):
        return (self.k_res[s, :, :n].astype(np.float32)[None],
                self.v_res[s, :, :n].astype(np.float32)[None])

    def decode(self, q, rows, scale, dt):
        from .api import _like

        q32 = V.to_numpy_f32(q)
        V.check_finite("q", q32)
        outs, lses = [], []
        for i, (s, pages, ql, rl) in enumerate(rows):
            block = self.gather(pages, ql)
            k_res, v_res = self.residual(s, rl)
            o, l_ = _ref_decode_attention(q32[i : i + 1], block, k_res, v_res, self.config,
                                          scale, return_lse=True)
            outs.append(o)
            lses.append(l_)
        return _like(q, np.concatenate(outs), dt), _like(q, np.concatenate(lses), "float32")

    def read_status(self) -> int:
        return 0
