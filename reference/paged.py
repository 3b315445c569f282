"""Paged storage of the packed cache: a pool of self-contained pages, block tables, slot mapping.

The oracle of the paged cache (``oscar.PagedKVCache``; docs/serving.md). A *page* holds ``P``
consecutive tokens of one sequence (``P = page_size``, a multiple of the 32-token tile and of
``key_group_size``) and everything needed to read them: its key codes, key (scale, min) per
channel and key group, value codes, value (scale, min) per token and value group, and the token
norms, in the arrays of docs/format.md with the batch axis replaced by the page axis:

    k_codes   uint32 [H, P/32, D*kb/32, 32]     k_params  param dtype [H, P/gk, D, 2]
    v_codes   uint32 [H, P, D*vb/32] (tiled)    v_params  param dtype [H, P, D/gv, 2] (tiled)
    norms     float32 [S, P]  (S = 1 or H; absent without token scaling)

One page is one run of ``page_bytes`` bytes (:class:`PageLayout`): the sections above one after
the other, each starting on a 16-byte boundary. The pool is ``uint8 [num_pages, page_bytes]``,
sized once; copying, sharing or swapping a page is copying one row.

Token ``pos`` of a sequence lives in page ``block_table[pos // P]`` at offset ``pos % P`` (its
*slot* is ``page * P + pos % P``, vLLM's slot mapping). Key groups are aligned to absolute
positions (``P`` and every flush boundary are multiples of ``key_group_size``), and a key group
never crosses a page, so quantizing a sequence's tokens into pages gives the bytes of the
contiguous cache's ``PackedBlock`` on the same tokens: gathering a sequence's pages
(:func:`gather_pages`) and cutting at its quantized length *is* the contiguous block.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .block import PackedBlock
from .pack import TILE_TOKENS

#: Every section of a page starts on this boundary (16-byte vector loads, cp.async).
SECTION_ALIGN = 16
#: Section names in page order (norms last: absent without token scaling).
SECTIONS = ("k_codes", "k_params", "v_codes", "v_params", "norms")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """Where each packed array of a page sits in its bytes.

    Attributes:
        page_size: tokens per page, P.
        sections: ``name -> (byte offset, shape per page, numpy dtype)``.
        page_bytes: bytes per page (a multiple of SECTION_ALIGN).
        tokens_per_row: ``name -> tokens per step of the array's token axis`` (axis 1 of the
            per-page shape): 32 for ``k_codes`` (tiles), ``key_group_size`` for ``k_params``,
            1 for the others.
    """

    page_size: int
    num_kv_heads: int
    head_dim: int
    sections: dict
    page_bytes: int
    tokens_per_row: dict

    def token_rows(self, name: str, tokens: int) -> int:
        """Length along array ``name``'s token axis of ``tokens`` tokens."""
        return tokens // self.tokens_per_row[name]

    def views(self, pool: np.ndarray) -> dict:
        """Typed views ``name -> [num_pages, *shape]`` of a ``uint8 [num_pages, page_bytes]``
        pool (no copy: writing a view writes the pool)."""
        n = pool.shape[0]
        out = {}
        for name, (off, shape, dt) in self.sections.items():
            strides = [np.dtype(dt).itemsize]
            for s in reversed(shape[1:]):
                strides.insert(0, strides[0] * s)
            out[name] = np.ndarray((n,) + shape, dtype=dt, buffer=pool, offset=off,
                                   strides=(self.page_bytes,) + tuple(strides))
        return out


def page_layout(config, page_size: int, num_kv_heads: int, head_dim: int) -> PageLayout:
    """The :class:`PageLayout` of ``config`` at ``page_size`` tokens per page (validated by the
    caller: a multiple of 32 and of ``config.key_group_size``)."""
    c, p, h, d = config, page_size, num_kv_heads, head_dim
    pd = np.dtype(np.float16 if c.param_dtype == "float16" else np.float32)
    shapes = dict(
        k_codes=((h, p // TILE_TOKENS, d * c.key_bits // 32, TILE_TOKENS), np.dtype(np.uint32)),
        k_params=((h, p // c.key_group_size, d, 2), pd),
        v_codes=((h, p, d * c.value_bits // 32), np.dtype(np.uint32)),
        v_params=((h, p, d // c.value_group_size, 2), pd),
    )
    if c.scale_tokens:
        shapes["norms"] = ((1 if c.norm_scope == "token" else h, p), np.dtype(np.float32))
    sections, off = {}, 0
    for name in SECTIONS:
        if name not in shapes:
            continue
        shape, dt = shapes[name]
        sections[name] = (off, shape, dt)
        off = _round_up(off + int(np.prod(shape)) * dt.itemsize, SECTION_ALIGN)
    per_row = dict(k_codes=TILE_TOKENS, k_params=c.key_group_size, v_codes=1, v_params=1, norms=1)
    return PageLayout(page_size=p, num_kv_heads=h, head_dim=d, sections=sections,
                      page_bytes=off, tokens_per_row=per_row)


def page_runs(slots: np.ndarray, page_size: int):
    """Split consecutive tokens' ``slots`` (int64 ``[T]``, page-aligned runs) into
    ``[(first token, page, offset in page, tokens)]``, one entry per page touched."""
    pages = slots // page_size
    cuts = np.flatnonzero(np.diff(pages)) + 1
    starts = np.concatenate(([0], cuts)).astype(np.int64)
    ends = np.concatenate((cuts, [len(slots)])).astype(np.int64)
    return [(int(a), int(pages[a]), int(slots[a] % page_size), int(b - a))
            for a, b in zip(starts, ends)]


def write_pages(views: dict, layout: PageLayout, block: PackedBlock, slots: np.ndarray) -> None:
    """Scatter a packed block of one sequence (batch 1, ``T`` tokens) into the pages of its
    tokens' ``slots`` (int64 ``[T]``). The caller guarantees alignment: each page run starts at
    an offset that is a multiple of ``key_group_size`` and covers whole key groups."""
    arrays = block.arrays()
    for first, page, off, n in page_runs(slots, layout.page_size):
        for name in layout.sections:
            a, b, o = (layout.token_rows(name, x) for x in (first, first + n, off))
            views[name][page, :, o : o + (b - a)] = arrays[name][0, :, a:b]


def gather_pages(views: dict, layout: PageLayout, pages, num_tokens: int) -> PackedBlock:
    """The first ``num_tokens`` tokens of a sequence whose pages are ``pages`` (its block-table
    row), as a contiguous ``PackedBlock`` of batch 1 (a copy)."""
    used = np.asarray(pages, np.int64)[: -(-num_tokens // layout.page_size)]
    out = {}
    for name in SECTIONS:
        if name not in layout.sections:
            out[name] = None
            continue
        g = views[name][used]  # [n, S or H, rows, ...]
        g = np.moveaxis(g, 0, 1)  # [S or H, n, rows, ...]
        g = g.reshape((g.shape[0], g.shape[1] * g.shape[2]) + g.shape[3:])
        out[name] = np.ascontiguousarray(g[None, :, : layout.token_rows(name, num_tokens)])
    return PackedBlock(**out)


def slot_mapping(block_table_row, positions, page_size: int) -> np.ndarray:
    """vLLM's slot mapping of token ``positions`` of one sequence: int64
    ``block_table_row[pos // P] * P + pos % P``."""
    pos = np.asarray(positions, np.int64)
    row = np.asarray(block_table_row, np.int64)
    return row[pos // page_size] * page_size + pos % page_size
