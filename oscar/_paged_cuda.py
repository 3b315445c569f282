"""The Numba backend of :class:`oscar.PagedKVCache`: pages and residual windows on a CUDA device.

Storage: the page pool is one ``uint32 [num_pages, page_bytes / 4]`` device buffer (the byte
layout of ``oscar.reference.paged.PageLayout``), the residual windows
``[max_seqs, num_kv_heads, residual_length, head_dim]`` in the input dtype (bfloat16 as int16
bits), the per-sequence lengths int32 ``[max_seqs]`` (mirrored from the host after each write).
On a GPU the buffers are torch tensors (torch's caching allocator) and the inputs torch CUDA
tensors; under the CUDA simulator (CPU CI) they are NumPy arrays handed to the kernels
zero-copy, so this whole class runs in the simulator on NumPy inputs.

Write (:meth:`PagedNumbaStore.write`), per call, whatever the number of sequences:
  1. ``copy_tokens``: the tokens already held by the windows that fill, into staging windows
     ``[W, H, R, D]``;
  2. ``copy_tokens``: every new token to its staging window or its sequence's residual window;
  3. the fused quantize kernel (kernels_numba/quantize.py) on the W staging windows (batch W):
     the same bytes as the reference's ``quantize_block``;
  4. ``copy_runs``: each section of the W packed windows into the pages their tokens' slots name
     (one run of words per section, head and page run).
The host plans it (which windows fill, where each token goes): the slot mapping and sequence ids
are read on the host (a synchronization for device tensors). Issue 25's device-side append is
what removes that; see docs/serving.md.

Decode (:meth:`PagedNumbaStore.decode`), two paths:

* **paged v3** (:meth:`PagedNumbaStore._decode_paged`) where the paged specialization of the v3
  split kernel runs (``attention.paged_unsupported`` is None: SPLIT_VERSION 3 and v3 supports
  the configuration, i.e. rows = G * q_len <= 32, float16 params, head_dim * bits multiples of
  128, ...; the Llama-3.1-8B default is one): one launch (plus the merge kernel where it does
  not fuse) for every row, whatever its lengths. The split kernel reads each tile from its page
  through the block table (uploaded per call: int32 ``[num_seqs, pages of the longest row]``
  built from the validated rows) and each row's lengths from an int32 ``[num_seqs, 4]`` array;
  the residual windows are the slots' own buffers when the rows are slots ``0 .. n - 1`` in
  order, else the rows' windows gathered into ``[num_seqs, H, R, D]`` (``copy_tokens``, at most
  R - 1 tokens per row: the kernel's residual blocks and the merge kernel index the residual by
  row). Residual tokens and merge are the contiguous kernels'.
* **interim gather** (:meth:`PagedNumbaStore._decode_gather`) everywhere else (the v1
  configurations: float32 params, rows that v3's row blocks do not take, head_dim * bits not a multiple of 128 such
  as head_dim 32 at 2 bits; or ``OSCAR_SPLIT_KERNEL=1``): rows with the same (quantized,
  residual) lengths are gathered from their pages into a contiguous workspace (``copy_runs``)
  and the contiguous kernels run on it. It moves every page once more per step (roughly
  doubling a memory-bound step's traffic).

Verified: the paged v3 kernel equals the contiguous v3 kernel bit for bit and the reference in
the CUDA simulator and on an H100 (2026-12-08, at Llama-3.1-8B shapes). This store's own GPU
test (writes + decode against the reference) failed there on a flush bug, since fixed (the
int32 code scratch now passed as uint32) and not yet re-run on a GPU (docs/serving.md).
"""

from __future__ import annotations

import numpy as np

from . import _validate as V
from .kernels_numba import attention as _attn
from .kernels_numba import paged as _pk
from .kernels_numba import quantize as _quant
from .kernels_numba._compat import SIMULATOR, cuda
from .reference.block import PackedBlock
from .reference.paged import PageLayout, gather_pages, page_runs


class _ArrayView:
    """A strided view of device memory for ``cuda.as_cuda_array`` (no copy): a section of the
    page pool as ``[num_pages, *shape]`` with page stride ``page_bytes``. Keeps its owner alive."""

    def __init__(self, owner, ptr, shape, strides, dtype):
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": tuple(int(x) for x in shape), "strides": tuple(int(x) for x in strides),
            "typestr": np.dtype(dtype).str, "data": (int(ptr), False), "version": 3}

_ELEM = {"float16": np.float16, "float32": np.float32, "bfloat16": np.int16}


class _Memory:
    """Device buffers as torch tensors (GPU) or NumPy arrays (CUDA simulator), with Numba views.

    ``zeros`` returns the holder (torch tensor or NumPy array); ``nb`` its Numba view (zero
    copy); ``host`` a NumPy copy.
    """

    def __init__(self, device):
        self.sim = SIMULATOR
        if self.sim:
            self.device = "cuda (simulator)"
            return
        import torch

        self.torch = torch
        dev = torch.device("cuda" if device is None else device)
        if dev.type != "cuda":
            raise ValueError(f"device: expected a CUDA device for backend='numba', got {device!r}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev

    def _tdt(self, dt):
        t = self.torch
        return {np.dtype(np.uint32): t.int32, np.dtype(np.int32): t.int32,
                np.dtype(np.int64): t.int64, np.dtype(np.int16): t.int16,
                np.dtype(np.float16): t.float16, np.dtype(np.float32): t.float32}[np.dtype(dt)]

    def zeros(self, shape, dt):
        if self.sim:
            # the element type torch would hold (uint32 codes as int32), so that a missing
            # uint32 view fails in the simulator as it does on the GPU
            return np.zeros(shape, np.int32 if np.dtype(dt) == np.uint32 else dt)
        return self.torch.zeros(shape, dtype=self._tdt(dt), device=self.device)

    def upload(self, a: np.ndarray):
        a = np.ascontiguousarray(a)
        if self.sim:
            return a
        return self.torch.from_numpy(a).to(self.device)

    def nb(self, x, dt=None):
        """Numba view of a holder; ``dt`` reinterprets its elements (same total bytes)."""
        if self.sim:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            return FakeCUDAArray(x if dt is None else x.view(dt))
        if dt is None:
            return cuda.as_cuda_array(x)
        # torch reinterprets (sizes may differ: float16 pairs -> one word); Numba then only
        # relabels int32 as uint32 (torch has no uint32 kernels; the bits are the same)
        x = x.view(self._tdt(dt))
        view = cuda.as_cuda_array(x)
        return view.view(np.uint32) if np.dtype(dt) == np.uint32 else view

    def host(self, x) -> np.ndarray:
        if self.sim:
            return np.array(x)
        return x.cpu().numpy()


class PagedNumbaStore:
    """Pages, residual windows and lengths of a CUDA paged cache (module doc)."""

    backend = "numba"

    def __init__(self, layout: PageLayout, num_pages, max_seqs, dtype, config, device,
                 pool=None):
        self.mem = _Memory(device)
        self.device = self.mem.device
        self.layout, self.config, self.dtype = layout, config, dtype
        self.elem = _ELEM[dtype]
        if self.mem.sim and dtype == "bfloat16":
            raise TypeError("dtype: the CUDA simulator takes NumPy inputs, which have no "
                            "bfloat16; use float16 or float32")
        h, d, r = layout.num_kv_heads, layout.head_dim, config.residual_length
        self.page_words = layout.page_bytes // 4
        if pool is None:
            self.pool = self.mem.zeros((num_pages, self.page_words), np.uint32)
        else:  # the caller's uint8 [num_pages, page_bytes] (validated), as words
            self.check_device("pool", pool)
            self.pool = pool.view(np.uint32) if self.mem.sim else pool.view(self.mem.torch.int32)
        self.k_res = self.mem.zeros((max_seqs, h, r, d), self.elem)
        self.v_res = self.mem.zeros((max_seqs, h, r, d), self.elem)
        self.status = self.mem.zeros((1,), np.int32)
        self.lengths = self.mem.zeros((2, max_seqs), np.int32)  # quantized, residual
        self._stage_cap = 0

    # --- validation hooks ------------------------------------------------------------------
    def check_device(self, name, x) -> None:
        if self.mem.sim:
            if not isinstance(x, np.ndarray):
                raise TypeError(f"{name}: expected a NumPy array (the CUDA simulator), got "
                                f"{type(x).__name__}")
            return
        if not (V.is_torch(x) and x.is_cuda and x.device == self.device):
            where = x.device if V.is_torch(x) else "host (numpy)"
            raise ValueError(f"{name}: expected a CUDA tensor on {self.device} (the cache's "
                             f"device), got {where}")

    def set_lengths(self, quantized, residual) -> None:
        lengths = np.stack((quantized, residual)).astype(np.int32)
        if self.mem.sim:
            self.lengths[...] = lengths
        else:
            self.lengths.copy_(self.mem.upload(lengths))

    # --- inputs ----------------------------------------------------------------------------
    def _tokens(self, x):
        """``[num_tokens, H, D]`` input as a Numba ``[num_tokens, H, 1, D]`` view (copy-free)."""
        if self.mem.sim:
            return self.mem.nb(np.ascontiguousarray(x)[:, :, None, :])
        if x.dtype == self.mem.torch.bfloat16:
            x = x.view(self.mem.torch.int16)
        return cuda.as_cuda_array(x.unsqueeze(2))

    def _stage(self, windows: int):
        """Staging windows and packed scratch for ``windows`` windows (grown, kept)."""
        if windows > self._stage_cap:
            cap = max(windows, 2 * self._stage_cap)
            h, d, r = self.layout.num_kv_heads, self.layout.head_dim, self.config.residual_length
            self.k_stage = self.mem.zeros((cap, h, r, d), self.elem)
            self.v_stage = self.mem.zeros((cap, h, r, d), self.elem)
            self.scratch = {}
            for name, (_off, shape, dt) in self.layout.sections.items():
                rows = self.layout.token_rows(name, r)
                full = (cap, shape[0], rows) + shape[2:]  # the window's arrays, batch = window
                self.scratch[name] = self.mem.zeros(full, dt)
            self._stage_cap = cap
        return windows

    def _run_table(self, name, rows_total, runs_in_rows, to_pages: bool):
        """int64 ``[n, 3]`` (src word, dst word, words) for section ``name``.

        ``runs_in_rows``: ``[(row, first token, page, offset in page, tokens)]`` with ``row``
        the staging/workspace row whose tokens ``first ..`` go to (or come from) the page.
        ``rows_total``: tokens per row of the contiguous side.
        """
        off, shape, dt = self.layout.sections[name]
        lay = self.layout
        row_words = int(np.prod(shape[2:])) * np.dtype(dt).itemsize // 4
        heads, p_rows = shape[0], shape[1]
        c_rows = lay.token_rows(name, rows_total)
        out = []
        for row, first, page, o, n in runs_in_rows:
            a, nr, po = lay.token_rows(name, first), lay.token_rows(name, n), lay.token_rows(name, o)
            for hh in range(heads):
                contiguous = ((row * heads + hh) * c_rows + a) * row_words
                paged = page * self.page_words + off // 4 + (hh * p_rows + po) * row_words
                src, dst = (contiguous, paged) if to_pages else (paged, contiguous)
                out.append((src, dst, nr * row_words))
        return np.asarray(out, np.int64).reshape(-1, 3)

    # --- write -----------------------------------------------------------------------------
    def write(self, k, v, plan) -> None:
        r = self.config.residual_length
        windows = sum(w.windows for w in plan)
        held_items, stage_items, res_items = [], [], []  # (src row, src pos, dst row, dst pos)
        base = 0
        flush_runs = []
        for w in plan:
            flush = w.windows * r
            if w.windows:
                held_items += [(w.seq, j, base, j) for j in range(w.held)]
                for j in range(w.windows):
                    for first, page, o, n in page_runs(w.flush_slots[j * r : (j + 1) * r],
                                                       self.layout.page_size):
                        flush_runs.append((base + j, first, page, o, n))
            for i, t in enumerate(w.idx):
                c = w.held + i
                if c < flush:
                    stage_items.append((int(t), 0, base + c // r, c % r))
                else:
                    res_items.append((int(t), 0, w.seq, c - flush))
            base += w.windows
        ks, vs = self._tokens(k), self._tokens(v)
        launches = []
        if windows:
            self._stage(windows)
            kst, vst = self.mem.nb(self.k_stage), self.mem.nb(self.v_stage)
            launches += [(self.mem.nb(self.k_res), self.mem.nb(self.v_res), held_items, kst, vst),
                         (ks, vs, stage_items, kst, vst)]
        launches.append((ks, vs, res_items, self.mem.nb(self.k_res), self.mem.nb(self.v_res)))
        with self._launch() as stream:
            for src_k, src_v, items, dst_k, dst_v in launches:
                if not items:
                    continue
                a = np.asarray(items, np.int32).T.copy()
                idx = [self.mem.upload(x) for x in a]
                _pk.copy_tokens(src_k, src_v, self.mem.nb(idx[0]), self.mem.nb(idx[1]), dst_k,
                                dst_v, self.mem.nb(idx[2]), self.mem.nb(idx[3]), stream=stream)
            if windows:
                self._flush(windows, flush_runs, stream)

    def _gather_residual(self, src, tok, dst, k_res, v_res, keep, stream) -> None:
        """One launch: residual token ``tok[i]`` of sequence ``src[i]`` into row ``dst[i]``,
        same token, of ``k_res``/``v_res`` (the uploaded index arrays join ``keep``)."""
        items = [self.mem.upload(np.asarray(x, np.int32)) for x in (src, tok, dst)]
        keep += items
        _pk.copy_tokens(self.mem.nb(self.k_res), self.mem.nb(self.v_res),
                        self.mem.nb(items[0]), self.mem.nb(items[1]),
                        self.mem.nb(k_res), self.mem.nb(v_res),
                        self.mem.nb(items[2]), self.mem.nb(items[1]), stream=stream)

    def _flush(self, windows, flush_runs, stream) -> None:
        lay, r = self.layout, self.config.residual_length
        # codes are uint32 for the kernels (torch holds them as int32: the same bits)
        sc = {n: self.mem.nb(a[:windows], np.uint32 if n.endswith("codes") else None)
              for n, a in self.scratch.items()}
        norms = sc.get("norms")
        if norms is None:
            norms = self.mem.nb(self.mem.zeros((1, 1, 1), np.float32))
        kst, vst = self.k_stage[:windows], self.v_stage[:windows]
        _quant.quantize_block(self.mem.nb(kst), self.mem.nb(vst), sc["k_codes"], sc["k_params"],
                              sc["v_codes"], sc["v_params"], norms, self.mem.nb(self.status),
                              self.config, self.dtype, stream=stream)
        pool = self.mem.nb(self.pool.reshape(-1), np.uint32)
        for name in lay.sections:
            runs = self.mem.upload(self._run_table(name, r, flush_runs, to_pages=True))
            flat = self.mem.nb(self.scratch[name].reshape(-1), np.uint32)
            # runs stays referenced until the launch is queued; torch frees a tensor's memory
            # for reuse only in stream order, after the kernel that reads it
            _pk.copy_runs(flat, pool, self.mem.nb(runs), stream=stream)

    def _launch(self):
        if self.mem.sim:
            import contextlib

            return contextlib.nullcontext(0)
        from ._cuda_bridge import _Launch

        return _Launch(self.device)

    # --- read ------------------------------------------------------------------------------
    def gather(self, pages, quantized_len) -> PackedBlock:
        views = self.layout.views(self.mem.host(self.pool).view(np.uint8))
        return gather_pages(views, self.layout, pages, quantized_len)

    def residual(self, s, n):
        out = []
        for buf in (self.k_res, self.v_res):
            x = self.mem.host(buf[s, :, :n])
            if self.dtype == "bfloat16":
                x = (x.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
            out.append(x.astype(np.float32)[None])
        return tuple(out)

    def read_status(self) -> int:
        return int(self.mem.host(self.status)[0])

    def decode(self, q, rows, scale, dt):
        """Decode attention of ``q`` over ``rows`` ([(seq, pages, quantized, residual)],
        validated): the paged v3 kernel where it runs, else the interim gather (module doc)."""
        h, d = self.layout.num_kv_heads, self.layout.head_dim
        b, hq, q_len, _ = (int(x) for x in q.shape)
        if _attn.paged_unsupported(self.config, d, hq // h, q_len, self.layout.page_size) is None:
            return self._decode_paged(q, rows, scale, dt)
        return self._decode_gather(q, rows, scale, dt)

    def section_views(self):
        """Numba views ``name -> [num_pages, *shape]`` of the pool's sections (strided by
        ``page_bytes``; no copy), the arrays the paged decode kernel reads."""
        lay = self.layout
        if self.mem.sim:
            return {n: self.mem.nb(x) for n, x in lay.views(self.pool.view(np.uint8)).items()}
        base = self.pool.data_ptr()
        n = int(self.pool.shape[0])
        out = {}
        for name, (off, shape, dt) in lay.sections.items():
            strides, size = [], np.dtype(dt).itemsize
            for s in reversed(shape):
                strides.insert(0, size)
                size *= s
            view = _ArrayView(self.pool, base + off, (n,) + tuple(shape),
                              (lay.page_bytes,) + tuple(strides), dt)
            out[name] = cuda.as_cuda_array(view)
        return out

    def _decode_paged(self, q, rows, scale, dt):
        """One launch of the paged v3 kernel for all rows (module doc)."""
        lay, cfg = self.layout, self.config
        h, p, r = lay.num_kv_heads, lay.page_size, cfg.residual_length
        b, hq, q_len, d = (int(x) for x in q.shape)
        q_elem = _ELEM[dt]
        seqs = np.asarray([s for s, _p, _q, _r in rows], np.int64)
        qls = np.asarray([ql for _s, _p, ql, _r in rows], np.int64)
        rls = np.asarray([rl for _s, _p, _q, rl in rows], np.int64)
        qmax, rmax = int(qls.max()), int(rls.max())
        # the block table of the rows: their validated pages, 0 past them (never read)
        table = np.zeros((b, max(1, -(-qmax // p))), np.int32)
        for i, (_s, pages, _ql, _rl) in enumerate(rows):
            table[i, : len(pages)] = pages
        lengths = _attn.uniform_lengths(b, 0, 0)
        lengths[:, _attn.LEN_QUANTIZED] = qls
        lengths[:, _attn.LEN_RESIDUAL] = rls
        keep = [self.mem.upload(table), self.mem.upload(lengths)]
        out = self.mem.zeros((b, hq, q_len, d), q_elem)
        lse = self.mem.zeros((b, hq, q_len), np.float32)
        nsplit = _attn.plan_splits(cfg, b, h, d, hq // h, q_len, dt, self.dtype, qmax, rmax,
                                   _attn._num_sms(), page_size=p)
        work = {n: self.mem.zeros(sh, _attn.WORKSPACE_DTYPES[n])
                for n, sh in _attn.workspace_shapes(b, hq, q_len, d, nsplit).items()}
        no_norms = None if "norms" in lay.sections else self.mem.zeros((1, 1, 1), np.float32)
        with self._launch() as stream:  # (Numba views are made in the device's context)
            views = self.section_views()
            norms = views["norms"] if no_norms is None else self.mem.nb(no_norms)
            if np.array_equal(seqs, np.arange(b)):  # slots 0 .. b - 1: their own windows
                k_res, v_res = self.k_res[:b], self.v_res[:b]
            else:  # the rows' windows, gathered by row (one launch)
                k_res = self.mem.zeros((b, h, r, d), self.elem)
                v_res = self.mem.zeros((b, h, r, d), self.elem)
                if rmax:
                    src = np.concatenate([np.full(n, s, np.int32) for s, n in zip(seqs, rls)])
                    tok = np.concatenate([np.arange(n, dtype=np.int32) for n in rls])
                    dst = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(rls)])
                    self._gather_residual(src, tok, dst, k_res, v_res, keep, stream)
            if self.mem.sim:
                qd = np.ascontiguousarray(q)
            else:
                qd = q.contiguous()
                if dt == "bfloat16":
                    qd = qd.view(self.mem.torch.int16)
            _attn.decode_attention(
                self.mem.nb(qd), views["k_codes"], views["k_params"], views["v_codes"],
                views["v_params"], norms, self.mem.nb(k_res), self.mem.nb(v_res),
                self.mem.nb(out), self.mem.nb(lse), {n: self.mem.nb(w) for n, w in work.items()},
                cfg, scale, qmax, rmax, dt, self.dtype, nsplit, lengths=self.mem.nb(keep[1]),
                stream=stream, block_table=self.mem.nb(keep[0]), page_size=p)
        if not self.mem.sim and dt == "bfloat16":
            out = out.view(self.mem.torch.bfloat16)
        return out, lse

    def _decode_gather(self, q, rows, scale, dt):
        """Interim decode (module doc): per group of rows with equal lengths, gather their pages
        and residual windows into a contiguous workspace, then the contiguous kernels."""
        lay, cfg = self.layout, self.config
        b, hq, q_len, d = (int(x) for x in q.shape)
        q_elem = _ELEM[dt]
        out = self.mem.zeros((b, hq, q_len, d), q_elem)
        lse = self.mem.zeros((b, hq, q_len), np.float32)
        groups = {}
        for i, (s, pages, ql, rl) in enumerate(rows):
            groups.setdefault((ql, rl), []).append(i)
        q_host = q if self.mem.sim else None
        with self._launch() as stream:
            for (ql, rl), idx in groups.items():
                g = len(idx)
                n_pages = -(-ql // lay.page_size)
                cap = max(n_pages, 1) * lay.page_size
                ws = {}
                for name, (_off, shape, pdt) in lay.sections.items():
                    ws[name] = self.mem.zeros((g, shape[0], lay.token_rows(name, cap))
                                              + shape[2:], pdt)
                runs = [(j, p * lay.page_size, int(rows[i][1][p]), 0, lay.page_size)
                        for j, i in enumerate(idx) for p in range(n_pages)]
                pool = self.mem.nb(self.pool.reshape(-1), np.uint32)
                keep = []
                for name in lay.sections if runs else ():  # no quantized tokens: no pages
                    table = self.mem.upload(self._run_table(name, cap, runs, to_pages=False))
                    keep.append(table)
                    _pk.copy_runs(pool, self.mem.nb(ws[name].reshape(-1), np.uint32),
                                  self.mem.nb(table), stream=stream)
                seqs = np.asarray([rows[i][0] for i in idx], np.int32)
                k_res = self.mem.zeros((g,) + tuple(self.k_res.shape[1:]), self.elem)
                v_res = self.mem.zeros((g,) + tuple(self.v_res.shape[1:]), self.elem)
                # residual windows of the group's sequences, one launch: item (row j, token t)
                if rl:
                    t = np.tile(np.arange(rl, dtype=np.int32), g)
                    self._gather_residual(np.repeat(seqs, rl), t,
                                          np.repeat(np.arange(g, dtype=np.int32), rl),
                                          k_res, v_res, keep, stream)
                if self.mem.sim:
                    qg = np.ascontiguousarray(q_host[idx])
                else:
                    qg = q[self.mem.upload(np.asarray(idx, np.int64))].contiguous()
                    if dt == "bfloat16":
                        qg = qg.view(self.mem.torch.int16)
                og = self.mem.zeros((g, hq, q_len, d), q_elem)
                lg = self.mem.zeros((g, hq, q_len), np.float32)
                nsplit = _attn.choose_num_splits(g, lay.num_kv_heads, ql)
                work = {n: self.mem.zeros(sh, _attn.WORKSPACE_DTYPES[n])
                        for n, sh in _attn.workspace_shapes(g, hq, q_len, d, nsplit).items()}
                norms = ws.get("norms")
                if norms is None:
                    norms = self.mem.zeros((1, 1, 1), np.float32)
                u32 = lambda name: self.mem.nb(ws[name], np.uint32)  # noqa: E731
                _attn.decode_attention(
                    self.mem.nb(qg), u32("k_codes"), self.mem.nb(ws["k_params"]), u32("v_codes"),
                    self.mem.nb(ws["v_params"]), self.mem.nb(norms), self.mem.nb(k_res),
                    self.mem.nb(v_res), self.mem.nb(og), self.mem.nb(lg),
                    {n: self.mem.nb(w) for n, w in work.items()}, cfg, scale, ql, rl, dt,
                    self.dtype, nsplit, stream=stream)
                if self.mem.sim:
                    out[idx], lse[idx] = og, lg
                else:
                    at = self.mem.upload(np.asarray(idx, np.int64))
                    out[at], lse[at] = og, lg
        if not self.mem.sim and dt == "bfloat16":
            out = out.view(self.mem.torch.bfloat16)
        return out, lse
