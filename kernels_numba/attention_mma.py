"""Split kernel v3 of decode attention: tensor cores through inline PTX (``mma.sync``).

Computes the same partials as the v1 split kernel (attention_v1.py; per (batch, query head, row,
split): running max, sum of exps, unnormalized rotated value sum) for
:func:`oscar.reference.attention.decode_attention`; ``attention._build_split`` uses it when
:func:`unsupported` returns None. The merge kernel (attention_merge.py) is shared.

Grid ``(batch * num_kv_heads, num_splits)``, 128 threads = 4 warps; a split is a contiguous range
of whole key groups, warp w takes the key groups w, w + 4, ... of it with its own online-softmax
state, and the 4 warps merge by log-sum-exp through shared memory at the end. Inside a warp,
``g = lane // 4`` and ``t4 = lane % 4`` (the mma fragment coordinates).

More than 8 query rows (:func:`row_groups`; rows <= ROWS_MAX = 32): RG = ceil(rows / 8) row
groups (2 or 4). Warp w holds the 8 rows ``8 (w % RG) .. 8 (w % RG) + 7`` (one N = 8 mma tile,
its own softmax state and accumulators: the same per-warp code and registers as 8 rows) and
belongs to token lane ``w // RG``; the TL = 4 / RG token lanes split the key groups as the warps
do above (lane u takes groups u, u + TL, ...). The RG warps of a token lane compute on the same
staged tile: its first warp issues the cp.async copies into the lane's stage (the stage rows of
its RG warps) and the lane meets at a named barrier (``bar.sync 1 + lane, 32 RG``) after the
wait and after the tile, so every staged byte is read from global memory once, as with one row.
The epilogue merges row r over the TL warps holding it. A lane's stage holds 4 tiles where the
shared memory allows (:func:`_num_stages`: 3 tiles in flight, as many as 2 lanes of 2 stages).
Rows <= 8 compile to the same instructions as before row groups existed (the row-group code is
behind compile-time tests).

More rows than one block holds (:func:`row_blocks`; 64 rows at head_dim 128: GQA 8 at q_len 8,
GQA 4 at q_len 16): RB blocks per (batch, KV head, split), each holding ``ROWS = rows / RB``
consecutive rows ``R0 = rbk * ROWS ..`` (the fewest RB <= MAX_ROW_BLOCKS that divides rows with
a block that fits). Grid x = ``(b * H + kvh) * RB + rbk``: the RB blocks of a split are adjacent
in launch order, so they run together and stream the same tiles (the second read an L2 hit).
A block is the kernel above for its ROWS rows; only the query rows it loads, the causal limits
and the workspace rows it writes use the global row ``R0 + r``. Residual blocks: the head's
``NRES`` residual blocks spread over the RB x-blocks (``ceil(NRES / RB)`` block rows each; the
ones past NRES do nothing); the fused merge counts ``RB * (splits + residual rows)`` arrivals.
RB = 1 compiles to the same instructions as before row blocks existed (benchmarks/ptx_identity.py).

Both products are ``mma.sync.m16n8k16`` (float16 in, float32 accumulate); the query rows
(8 per warp) are the N = 8 side, so the packed codes are the large M/K operands:

* QK: ``S[token, row] = sum_c A[token, c] B[c, row]``, M = 16 tokens, K = 16 channels. A holds
  codes, B the pre-scaled query ``b'_rc = f16(qn_rc * s_c / S * 2**(10 - p_c))`` of the key group
  (qn = q~ / max|q~| per row, S = max_c s_c rounded up to a power of two, p_c = the bit at which
  channel c's code sits in A: |b'| < 2**10, no overflow, fewer subnormals than b). Every product
  is ``code * b * 2**-14``; score (log2 units) = ``n_t (F_r D + K_r)`` with
  ``F_r = 2**14 max|q~_r| S log2(e)`` and ``K_r = log2(e) sum_c q~_rc min_c`` (group constants).
* PV: ``O[c, row] = sum_t A[c, t] B[t, row]``, M = 16 channels, K = 16 tokens. A holds codes,
  B = ``p_rt * s_tj`` (value scale of token t, group j; p <= 1 so no overflow) per value group.
  The min term ``E[row, j] = sum_t p_rt min_tj`` is one more mma per 16 tokens with A = P
  (rows x tokens) and B = the mins, and the output is ``2**(24 - p) O + E`` (p = the bit of the
  accumulator's value slot after its shift: a compile-time constant per accumulator).

The unpack trick: a code of ``bits`` bits at bit p of a float16 whose exponent field is zero is
the subnormal ``code * 2**(p - 24)``, exact while ``p + bits <= 10``. Codes j and j + cpw/2 of a
word sit 16 bits apart, so ``word & mask_j`` (one LOP3) is a f16x2 A register of two codes; the
codes that sit higher than bit 10 - bits of their half share one shift (2-bit: pairs 0-4 in
place, pairs 5-7 after ``>> 10``). The tensor cores take subnormal float16 exactly
(tests/test_kernels_mma.py); the per-code power of two is folded into B (keys) or applied once
to the accumulators (values). Fragment index maps (the K dimension of an mma can be permuted
freely, and the M dimension of PV too, as long as both operands agree):

* keys (tile layout: word w of 32 tokens is 128 contiguous bytes): lane column t4 owns the key
  words ``t4 * KW/4 .. t4 * KW/4 + KW/4 - 1`` (all their code pairs); thread (g, t4) loads one of
  them for tokens 4g .. 4g+3 with one 16-byte load (2 loads per tile at 2 bits, head_dim 128).
  M rows g, g+8 of mma block mb are tokens 4g + 2mb, 4g + 2mb + 1. Of the thread's code pairs,
  numbered ``i * cpw/2 + j`` (word i, pair j), mma ch takes pairs 2ch (K indices 2t4, 2t4 + 1)
  and 2ch + 1 (K indices 2t4 + 8, 2t4 + 9).
* values (the value tile layout, docs/format.md section 2b): K index 2t4 + i (i = 0, 1) and
  2t4 + 8 + i are tokens 16kb + t4 + 4i and 16kb + t4 + 8 + 4i (token pairs 0 and 1 of the
  thread); M rows g, g + 8 of chunk ch are channels 16ch + g, 16ch + 8 + g (slots ch and
  NCH + ch). The thread's 2 VWT words of block kb are contiguous (one 16-byte load at 2 bits,
  head_dim 128; 32 lanes read 512 consecutive bytes) and hold exactly its codes: each word's low
  and high halves are one channel of the two tokens of a pair, so one LOP3 (plus one SHF shared
  by the slots above bit 10 - bits) makes an A register. The per-slot power of two is a
  compile-time constant applied to the accumulators at the end.

Memory: each warp stages its next tile (key codes, norms, the key group's params, value params,
value codes: 3.2 KB at the default config) with ``cp.async`` into one of two shared buffers while
it computes the current one, and reads them with 16-byte shared loads. All addresses are formed
once per tile (``global_address`` / ``shared_address``) and offset in 32-bit arithmetic inside the
intrinsics: Numba's own indexing (int64, wrap-around checks, Python floor division) was most of
the instructions of the first version. S is rounded to a power of two (no division).

The score tile goes to the PV layout through shared memory (8 x 32 floats per warp, XOR-swizzled
so that the stores and the loads are free of bank conflicts); the query fragments of a key group
are built by all 32 lanes (lane (g, t4) takes chunk g, reading its 4 values of a query row with
one 16-byte load: the prologue permutes the rows into that order) and exchanged through shared
memory with 8-byte stores; the key params in the stage are padded per lane column. The softmax
runs in log2 units with ``ex2.approx`` (the partials are converted to natural-log units at the
end). Per 32-token tile a warp issues 16 + 16 + 2 mma. docs/kernels.md has the measured steps and
where the time goes (latency at 4 warps per scheduler; no pipe saturated).

In the CUDA simulator the intrinsics and warp collectives come from ``ptx_sim`` (Python with the
PTX semantics), so CPU CI runs this kernel on tiny shapes.

Precision (derived in tests/test_kernels_attention.py): float16 rounding of b' (relative 2**-11,
absolute 2**-25 below the normal range) and of p and p * s; exact products, float32 accumulation.
Requirements (:func:`unsupported`): rows <= 32 per block (up to 8 row blocks of equal rows),
float16 params, value groups of >= 16 channels
and at most 8 per head, head_dim a multiple of 16, ``head_dim * key_bits`` a multiple of 128
(4 key words per lane column), ``head_dim * value_bits`` a multiple of 128 (at least one value
word per token pair and thread), 48 KB of static shared memory.
"""

from __future__ import annotations

import math

from ._compat import SIMULATOR, cuda, np
from .attention_residual import blocks_per_head as _res_blocks_per_head
from .common import (LEN_QUANTIZED, LEN_RESIDUAL, LEN_START, fwht_warp, split_block,
                     write_empty_split)

if SIMULATOR:  # Python versions with the PTX semantics (ptx_sim.py), for CPU CI
    from . import ptx_sim as _sim
    from .ptx_sim import (bar_sync, cp_async16_bo, cp_async_commit, cp_async_wait0,
                          cp_async_wait1, cp_async_wait2, cp_async_wait3, ex2, f16x2_hi,
                          f16x2_lo, float_as_uint, global_address, hmul2, ldg1s, lds1, lds1f,
                          lds2, lds4, lds4f, mma_f16,
                          pack_f16x2, prmt, redux_max_u32, shared_address, sts2, sts1f,
                          uint_as_float)

    _sim.install()  # warp shuffles, votes and syncwarp for the simulator's cuda module
else:
    from .ptx import (bar_sync, cp_async16_bo, cp_async_commit, cp_async_wait0,
                      cp_async_wait1, cp_async_wait2, cp_async_wait3, ex2, f16x2_hi, f16x2_lo,
                      float_as_uint, global_address,
                      hmul2, ldg1s, lds1, lds1f, lds2, lds4, lds4f, mma_f16, pack_f16x2, prmt,
                      redux_max_u32, shared_address, sts1f, sts2, uint_as_float)

#: alignment of the shared arrays read with vector loads (the simulator rejects the argument;
#: its NumPy arrays are aligned anyway)
ALIGN16 = None if SIMULATOR else 16

NUM_THREADS = 128
NUM_WARPS = 4
TILE = 32
#: Query rows one block holds: up to ROWS_PER_WARP with every warp holding all rows (row
#: groups 1), beyond that in row groups (:func:`row_groups`); more rows per KV head run in row
#: blocks (:func:`row_blocks`).
ROWS_MAX = 32
#: Row blocks: a step with more rows per KV head than one block holds runs in up to this many
#: blocks per (batch, KV head, split), each holding an equal share of the rows
#: (:func:`row_blocks`; adjacent in the grid, so they stream the same tiles together).
MAX_ROW_BLOCKS = 8
#: Query rows one warp's mma tiles hold: the N = 8 side of m16n8k16.
ROWS_PER_WARP = 8
#: In row-group mode every (token lane's) staging area holds at least this many words: the
#: fused merge's weights (attention_fused.scratch_words(MAX_SPLITS + 1) = 1,028) and a residual
#: block's scores use the stage as scratch.
MIN_SCRATCH_WORDS = 2048
SHARED_LIMIT = 48 * 1024
FULL = 0xFFFFFFFF
#: words of padding after each lane column's quarter of the key params in the stage (their 8-byte
#: reads by the 4 lane columns then hit different banks)
KP_PAD = 8
#: a code of ``bits`` bits at float16 bit ``p`` with a zero exponent field is the subnormal
#: ``code * 2**(p - 24)``, exact, as long as ``p + bits <= 10`` (inside the mantissa)
_MANT = 10


def _stage_words(key_bits, value_bits, value_group_size, head_dim):
    """uint32 words of one warp's staging buffer: one tile's key codes, norms, key params (one
    group), value params and value codes, each region 16-byte aligned."""
    d = head_dim
    return ((d * key_bits // 32) * 32 + 32 + (d + 4 * KP_PAD) + 32 * (d // value_group_size)
            + 32 * (d * value_bits // 32))


def row_groups(rows):
    """Row groups of the kernel for ``rows`` query rows per KV head: 1 up to ROWS_PER_WARP (every
    warp holds all rows and streams its own key groups), else ``ceil(rows / 8)`` (2 or 4): warp
    w holds the 8 rows ``8 (w % RG) ..`` and the RG warps of token lane ``w // RG`` stream the
    same key groups from one shared stage (docs/kernels.md, "More query rows")."""
    if rows <= ROWS_PER_WARP:
        return 1
    return 2 if rows <= 2 * ROWS_PER_WARP else 4


def _stage_row_words(key_bits, value_bits, value_group_size, head_dim, rows, stages):
    """uint32 words of each warp's row of the shared ``stage`` array: its NSTAGE tile buffers
    (row groups 1; in row-group mode a token lane's buffers span the RG rows of its warps), and
    the warp's final accumulators (its rows x head_dim) after the loop."""
    sw = stages * _stage_words(key_bits, value_bits, value_group_size, head_dim)
    rg = row_groups(rows)
    if rg == 1:
        return max(sw, rows * head_dim)
    per = -(-sw // rg)
    return max(per + (-per) % 4, ROWS_PER_WARP * head_dim, MIN_SCRATCH_WORDS // NUM_WARPS)


def _num_stages(key_bits, value_bits, value_group_size, head_dim, rows):
    """2 (double buffering: the next tile's loads fly while this one is computed) where the
    48 KB of static shared memory allow it, else 1. Row groups: 4 where they fit (a token lane
    keeps one stage for its RG warps, so 4 stages give it the tiles in flight of 2 lanes; at RG
    = 4 and head_dim 128 they fit in the stage rows the epilogue needs anyway)."""
    for stages in ((2, 1) if row_groups(rows) == 1 else (4, 2, 1)):
        need = shared_bytes(key_bits, value_bits, value_group_size, head_dim, rows, stages)
        if need <= SHARED_LIMIT:
            return stages
    return 0


def shared_bytes(key_bits, value_bits, value_group_size, head_dim, rows, stages):
    """Static shared memory of the v3 kernel (the final accumulators reuse the stage)."""
    nch = head_dim // 16
    stage = _stage_row_words(key_bits, value_bits, value_group_size, head_dim, rows, stages)
    # the query rows qs and their maxima (padded to whole row groups); per warp: stage, score
    # tile psh, fragment buffer bsh, esh (8 x 8), mw + lw, gbase (8 int64), the epilogue weights
    # wgt; then the fused merge's flag (an int32, padded to 16)
    qrows = rows if row_groups(rows) == 1 else ROWS_PER_WARP * row_groups(rows)
    return 4 * (qrows * (head_dim + 4) + qrows + NUM_WARPS * (stage + 8 * 32 + 8 * (nch * 8 + 8)
                                                          + 64 + 16 + 16 + 8)) + 16


def row_blocks(key_bits, value_bits, value_group_size, head_dim, rows):
    """Blocks per (batch, KV head, split) for ``rows`` query rows per KV head: 1 where one block
    takes them all (at most ROWS_MAX, in row groups beyond 8, and its static shared memory
    fits), else the fewest RB <= MAX_ROW_BLOCKS dividing ``rows`` such that one block takes
    ``rows / RB`` (docs/kernels.md, "Row blocks"); 0 when there is none."""
    for rb in range(1, MAX_ROW_BLOCKS + 1):
        if rows % rb == 0 and rows // rb <= ROWS_MAX and _num_stages(
                key_bits, value_bits, value_group_size, head_dim, rows // rb) > 0:
            return rb
    return 0


def block_rows(key_bits, value_bits, value_group_size, head_dim, rows):
    """Query rows one block of the kernel holds (``rows / row_blocks``; ``rows`` when none)."""
    rb = row_blocks(key_bits, value_bits, value_group_size, head_dim, rows)
    return rows // rb if rb else rows


def unsupported(key_bits, value_bits, value_group_size, head_dim, rows, param_dtype):
    """None when the v3 kernel handles this configuration, else the reason (a string).
    ``rows`` = G * q_len query rows per KV head (row groups beyond 8, :func:`row_groups`; row
    blocks beyond what one block holds, :func:`row_blocks`)."""
    if rows > ROWS_MAX * MAX_ROW_BLOCKS:
        return (f"{rows} query rows per KV head (at most {ROWS_MAX * MAX_ROW_BLOCKS}: "
                f"{ROWS_MAX} a block in at most {MAX_ROW_BLOCKS} blocks)")
    if param_dtype != "float16":
        return "float32 parameters (the float16 mma operands could overflow)"
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16"
    if value_group_size < 16 or head_dim // value_group_size > 8:
        return f"value groups of {value_group_size} channels (16 or more, at most 8 per head)"
    if (head_dim * key_bits) % 128:
        return f"head_dim {head_dim} at {key_bits} bits is not 4 key words per lane column"
    if (head_dim * value_bits) % 128:
        return f"head_dim {head_dim} at {value_bits} value bits is under one word per token pair"
    if row_blocks(key_bits, value_bits, value_group_size, head_dim, rows) == 0:
        if rows <= ROWS_MAX and _num_stages(key_bits, value_bits, value_group_size, head_dim,
                                            1) == 0:
            return "does not fit in 48 KB of static shared memory"
        return (f"{rows} query rows per KV head: no split into at most {MAX_ROW_BLOCKS} "
                f"blocks of equal rows that fit (at most {ROWS_MAX} rows a block, and 48 KB "
                "of static shared memory)")
    return None


def _code_fields(bits, pairs):
    """For code pair j of a word (code j of each 16-bit half), the right shift that brings it
    inside the float16 mantissa and its bit position after it: ``(shift, position)``. Codes are
    taken in place while they fit (position + bits <= 10); the rest share as few shifts as
    possible (2-bit codes: pairs 0-4 in place, one shift by 10 for pairs 5-7)."""
    out, sh = [], 0
    for j in range(pairs):
        if bits * (j + 1) - sh > _MANT:
            sh = bits * j
        out.append((sh, bits * j - sh))
    return out


def _pow2(e):
    return np.float32(2.0 ** e)


def scratch_words(key_bits, value_bits, value_group_size, head_dim, rows):
    """32-bit words of the staging buffers (all warps): the residual block's score scratch.
    ``rows`` per KV head (a block holds :func:`block_rows` of them)."""
    rows = block_rows(key_bits, value_bits, value_group_size, head_dim, rows)
    stages = _num_stages(key_bits, value_bits, value_group_size, head_dim, rows)
    return NUM_WARPS * _stage_row_words(key_bits, value_bits, value_group_size, head_dim, rows,
                                        stages)


def build_split_v3(key_bits, value_bits, key_group_size, value_group_size, head_dim, gqa, q_len,
                   rotate_keys, scale_tokens, norm_per_head, load_q, hadamard_scale,
                   residual=None, finish=None, page_size=0):
    """Python function of the v3 split kernel for one compile-time configuration.

    ``page_size``: 0 (the contiguous cache), or P > 0: the **paged** specialization (issue 27,
    docs/serving.md). The five packed arrays are then the per-section views of a page pool,
    ``[num_pages, H (S for norms), rows per page, ...]`` (strided: the page axis steps
    ``page_bytes``; the inner axes are C-contiguous), and the kernel takes one more argument,
    ``block_table`` (int32 ``[batch, max_blocks]``): tile t of row b is tile ``t % (P / 32)`` of
    page ``block_table[b, t // (P / 32)]``. Only the address formation differs: the per-split
    bases are those of page 0 (head ``kvh``), and :func:`prefetch` adds ``page * page_bytes``
    (the page read through the block table, one int32 load per tile) to the tile's offset
    inside its page. A key group never crosses a page (P is a multiple of the key group), so
    the key-group logic is unchanged. With ``page_size = 0`` the kernel is the contiguous one,
    instruction for instruction (every paged line is behind a compile-time test; PTX compared
    in docs/kernels.md, "Paged cache").

    ``residual``: None, or the device function of ``attention_residual.build_residual`` (built
    with ``qs_stride = head_dim + 4``): then a launch with ``res_blocks > 0`` has that many more
    block rows ``blockIdx.y < res_blocks`` whose blocks compute the residual partial (row group
    ``blockIdx.y``) at workspace slot ``num_splits`` (dispatched first, they run beside the
    split blocks), and split ``s`` is ``blockIdx.y == res_blocks + s``. Without it the kernel
    ignores ``k_res``, ``v_res`` and ``res_blocks``.

    ``finish``: None, or the device function of ``attention_fused.build_finish``: then a launch
    with ``fuse != 0`` ends every block with it, and the last block of each (batch, KV head)
    merges the partials into ``out`` and ``lse`` (no merge launch); ``counter`` (int32, zero
    before the launch) counts the arrivals and is left zero.

    Lengths: the host's ``quantized_len`` / ``residual_len`` are upper bounds that size the
    split plan; each row's own length and first visible token come from ``lengths`` (int32
    ``[batch, 4]``, common.LEN_START / LEN_QUANTIZED / LEN_RESIDUAL): a split's tiles are
    clipped to the row's packed tokens and start at the key group holding its first visible
    token (splits outside exit at once), and tokens before it are masked like the causal edge."""
    D, G, LQ = head_dim, gqa, q_len
    NROWS = G * LQ  # query rows per KV head (row r: query head kvh G + r // LQ, position r % LQ)
    # row blocks (row_blocks): RB blocks per (batch, KV head, split), x-adjacent in the grid,
    # block rbk holding the ROWS rows R0 = rbk ROWS .. R0 + ROWS - 1; everything below is
    # per block (ROWS its rows) except the global row index R0 + r of q, the causal limits and
    # the workspace. RB = 1: R0 = 0 and the kernel is the one without row blocks.
    RB = row_blocks(key_bits, value_bits, value_group_size, head_dim, NROWS)
    if RB == 0:
        why = unsupported(key_bits, value_bits, value_group_size, head_dim, NROWS, "float16")
        raise ValueError(f"v3 split kernel: {why}")
    ROWS = NROWS // RB
    NCH = D // 16
    KB, VB = key_bits, value_bits
    PAGED = page_size > 0
    if PAGED and (page_size % TILE or page_size % key_group_size):
        raise ValueError(f"page_size: expected a multiple of 32 and of the key group "
                         f"({key_group_size}), got {page_size}")
    TPP = max(page_size // TILE, 1)  # tiles per page (paged)
    KCPW = 32 // KB
    KHP = KCPW // 2
    VHC = 16 // VB  # value codes per 16-bit half word
    VWT = D * VB // 128  # value words per token pair a thread unpacks (2 VWT per 16-token block)
    KW, VW = D * KB // 32, D * VB // 32
    TPG = key_group_size // TILE
    LTPG = TPG.bit_length() - 1  # TPG is a power of two
    GV = value_group_size
    NGV = D // GV
    NW, NT = NUM_WARPS, NUM_THREADS
    BS = NCH * 8 + 8  # row stride (uint32) of the query-fragment exchange buffer
    NSTAGE = _num_stages(KB, VB, GV, D, ROWS)
    # staging buffer regions (uint32 offsets): key codes [KW][32], norms [32], key params
    # [D] (one (scale, min) pair per word), value params [32 NGV] (tiled order), value codes [32][VW]
    SW = _stage_words(KB, VB, GV, D)
    KC, NRM = 0, KW * 32
    KPO = NRM + 32
    VPO = KPO + D + 4 * KP_PAD
    LKPC = (D // 16).bit_length() - 1  # log2 of the 16-byte chunks per quarter
    VCO = VPO + 32 * NGV
    NSW = _stage_row_words(KB, VB, GV, D, ROWS, NSTAGE)  # also the warp's final accumulators
    # row groups (row_groups): RG warps share a token lane's tiles, each holding LR rows of
    # qs's QR (whole groups, padding rows zero); TL token lanes split the split's key groups
    RG = row_groups(ROWS)
    TL = NW // RG
    LR = ROWS if RG == 1 else ROWS_PER_WARP
    QR = ROWS if RG == 1 else ROWS_PER_WARP * RG
    NLT = 32 * RG  # threads of a token lane (its named barrier's count)
    FULLGROUPS = RG > 1 and ROWS == QR  # no padding row (16, 32 rows): row tests fold away
    NKC, NKP, NVP, NVC = KW * 8, D // 4, 8 * NGV, 8 * VW  # 16-byte copies per region and tile
    NCHI = (NCH + 7) // 8  # chunks per lane in the query-fragment build
    NPW = 4 * NCHI
    KWT = KW // 4  # key words per token that lane column t4 unpacks (all KHP pairs of each)
    fields = _code_fields(KB, KHP)
    KSH = tuple(np.uint32(f[0]) for f in fields)  # shift of key code pair j
    KMK = tuple(np.uint32(((1 << KB) - 1 << f[1]) * 0x10001) for f in fields)  # its mask after
    # B' = b * 2**(10 - p_j), p_j the position of pair j: every product A B' is code * b * 2**-14
    # (A = code * 2**(p_j - 24)). The factor's exponent field is 127 + 10 - p_j; the positions
    # (< 16) are packed 4 bits each, since a lane's pair index depends on g (indexing a tuple of
    # the factors compiled to a branch tree)
    KPOS = np.uint32(sum(f[1] << (4 * j) for j, f in enumerate(fields)))
    KEXP = np.uint32(127 + _MANT)
    QK_UNIT = _pow2(24 - _MANT)  # 2**14
    vfields = _code_fields(VB, VHC)
    VSH = tuple(np.uint32(f[0]) for f in vfields)  # shift of value code pair j (both halves)
    VMK = tuple(np.uint32(((1 << VB) - 1 << f[1]) * 0x10001) for f in vfields)
    VFAC = tuple(_pow2(24 - f[1]) for f in vfields)  # undoes the subnormal 2**(p - 24)
    SEL_LO, SEL_HI = np.uint32(0x5410), np.uint32(0x7632)
    ROTATE, SCALE_TOKENS, NORM_PER_HEAD = bool(rotate_keys), bool(scale_tokens), bool(norm_per_head)
    HS = np.float32(hadamard_scale)
    # array shapes must be literals (closure constants), not expressions, in a kernel
    DP, NACC, NBQ, NBV = D + 4, NCH * 4, NCH * 2, NGV * 2
    NVPS = 2 * NGV  # value-param scale words per lane and 16-token block
    NVX = 2 * VWT
    NQP = (ROWS * D + NT - 1) // NT  # query values per thread in the permutation pass
    CQ = D // 32  # query channels per lane in the prologue (consecutive)
    fwht_row = fwht_warp(D)
    ZERO_U = np.uint32(0)
    ABS16 = np.uint32(0x7FFF)
    ZERO_F = np.float32(0.0)
    LOG2E, LN2 = np.float32(1.0 / math.log(2.0)), np.float32(math.log(2.0))
    RESIDUAL = residual is not None
    # residual blocks per (batch, KV head) (attention_residual.blocks_per_head); with row
    # blocks each of the RB x-blocks has ceil(NRES / RB) block rows of them (the host's
    # res_blocks), and the ones past NRES do nothing
    NRES = _res_blocks_per_head(G, LQ) if RESIDUAL else 0
    if not RESIDUAL:  # never called (split >= 0); keeps the kernel's typing independent of it

        @cuda.jit(device=True)
        def residual(q, k_res, v_res, ws_max, ws_sum, ws_acc, scale, quantized_len,
                     residual_len, b, kvh, rb, slot, qs, pb, start):
            pass

    FUSED = finish is not None
    if not FUSED:

        @cuda.jit(device=True)
        def finish(ws_max, ws_sum, ws_acc, out, lse, counter, b, kvh, num_splits, res_slot,
                   arrivals, flag, wb):
            pass

    @cuda.jit(device=True)
    def umax32(a, b):
        """max of two uint32 compared in 32 bits (Numba widens ``w & m`` to 64 bits, and its
        ``max`` then compiled to two-word compares and selects)."""
        a32 = np.uint32(a)
        b32 = np.uint32(b)
        return a32 if a32 > b32 else b32

    @cuda.jit(device=True)
    def nanmax(a, b):
        """max that propagates NaN (a NaN score must reach its row's output)."""
        if a > b or a != a:
            return a
        return b

    def word_loader(n):
        """Device function: the ``n`` consecutive uint32 at .shared byte address ``so + base``
        into ``out[0 .. n)``, 16 bytes a load (one 8-byte load when n = 2; n is a power of two,
        head_dim being one)."""
        if n != 2 and n % 4:
            raise ValueError(f"word_loader: {n} words (2 or a multiple of 4)")

        @cuda.jit(device=True)
        def load(so, base, out):
            if n == 2:
                w0, w1 = lds2(so, base)
                out[0] = w0
                out[1] = w1
            else:
                for u in range(n // 4):
                    w0, w1, w2, w3 = lds4(so, base + 16 * u)
                    out[4 * u] = w0
                    out[4 * u + 1] = w1
                    out[4 * u + 2] = w2
                    out[4 * u + 3] = w3

        return load

    # the 2 VWT value words of a lane in a 16-token block (docs/format.md, "Value tiles") and its
    # 2 NGV value-param scale words (section 2c): contiguous runs
    load_vcodes = word_loader(NVX)
    load_vscales = word_loader(NVPS)

    @cuda.jit(device=True)
    def kcodes(x, j):
        """Key code pair j of word ``x`` as f16x2 subnormals ``code * 2**(p_j - 24)`` (one LOP3;
        the SHF of a shifted group is shared by its pairs after unrolling)."""
        return (x >> KSH[j]) & KMK[j]

    @cuda.jit(device=True)
    def vcodes(vx, i, n):
        """Slot n (channel 16 (n % NCH) + 8 (n // NCH) + g) of token pair i of this lane's value
        words as f16x2 subnormals ``code * 2**(p - 24)`` of the pair's two tokens."""
        j = n % VHC
        return (vx[i * VWT + n // VHC] >> VSH[j]) & VMK[j]

    # bytes per tile (per key group for k_params) of each array: its inner dimensions are
    # C-contiguous (checked by the launcher), so a tile is one fixed stride from the (b, head) base
    KC_TB, NRM_TB, KP_GB = KW * 32 * 4, TILE * 4, D * 4
    VP_TB, VC_TB = TILE * NGV * 4, TILE * VW * 4

    @cuda.jit(device=True)
    def copy_tile(sl, lane, t32, grp32, first, a0, a1, a2, a3, a4):
        """cp.async tile ``t32`` (uint32, counted from the array bases ``a0 .. a4``: the (batch,
        head) slices, or a page's) into the stage buffer at ``sl`` (its .shared address + 16 *
        lane), and the params of its key group ``grp32`` (uint32) when ``first`` (the group's
        first tile), as one commit group. Per array: a 32-bit multiply-add and a 64-bit add;
        the rest are immediates."""
        o = t32 * np.uint32(KC_TB) + np.uint32(16 * lane)
        ga = a0 + np.int64(o)
        for j in range((NKC + 31) // 32):
            if NKC % 32 == 0 or lane + 32 * j < NKC:
                cp_async16_bo(sl, 4 * KC + 512 * j, ga + 512 * j)
        if SCALE_TOKENS:
            if lane < 8:
                o = t32 * np.uint32(NRM_TB) + np.uint32(16 * lane)
                cp_async16_bo(sl, 4 * NRM, a1 + np.int64(o))
        if first:
            o = grp32 * np.uint32(KP_GB) + np.uint32(16 * lane)
            ga = a2 + np.int64(o)
            for j in range((NKP + 31) // 32):
                if NKP % 32 == 0 or lane + 32 * j < NKP:
                    pad = 4 * KP_PAD * ((lane + 32 * j) >> LKPC)  # after each quarter
                    cp_async16_bo(sl, 4 * KPO + 512 * j + pad, ga + 512 * j)
        o = t32 * np.uint32(VP_TB) + np.uint32(16 * lane)
        ga = a3 + np.int64(o)
        for j in range((NVP + 31) // 32):
            if NVP % 32 == 0 or lane + 32 * j < NVP:
                cp_async16_bo(sl, 4 * VPO + 512 * j, ga + 512 * j)
        o = t32 * np.uint32(VC_TB) + np.uint32(16 * lane)
        ga = a4 + np.int64(o)
        for j in range((NVC + 31) // 32):
            if NVC % 32 == 0 or lane + 32 * j < NVC:
                cp_async16_bo(sl, 4 * VCO + 512 * j, ga + 512 * j)
        cp_async_commit()

    @cuda.jit(device=True)
    def prefetch(sl, lane, tile, gb):
        """cp.async one tile (and its key group's params on the group's first tile) into a stage
        buffer, as one commit group (:func:`copy_tile`). ``gb`` holds the global address of the
        (batch, head) slice of each array (formed once per split and kept in shared memory: held
        in registers, ptxas re-derived all five from the array strides on every tile). The five
        bases are read before any copy: ptxas merges the reads into two 16-byte and one 8-byte
        load, and pads once (3 dummy loads before a copy whose address was just computed)
        instead of before every array's copies."""
        a0 = gb[0]
        a1 = gb[1]
        a2 = gb[2]
        a3 = gb[3]
        a4 = gb[4]
        copy_tile(sl, lane, np.uint32(tile), np.uint32(tile >> LTPG), (tile & (TPG - 1)) == 0,
                  a0, a1, a2, a3, a4)

    if PAGED:
        @cuda.jit(device=True)
        def prefetch(sl, lane, tile, gb):
            """:func:`prefetch` of the paged specialization: the same copies, of tile ``tile %
            TPP`` of page ``block_table[b, tile // TPP]``. ``gb[0..4]`` hold the addresses of
            page 0's (head) slice of each section, ``gb[5]`` that of the row's block-table row,
            ``gb[6]`` the page stride in bytes (page_bytes, the same for every section). TPP is
            a multiple of the tiles per key group, so ``tile`` and the page-local tile start a
            key group together."""
            a0 = gb[0]
            a1 = gb[1]
            a2 = gb[2]
            a3 = gb[3]
            a4 = gb[4]
            a5 = gb[5]
            a6 = gb[6]
            lp = np.uint32(np.uint32(tile) // np.uint32(TPP))  # constant divisor: mul.hi, shift
            lt = np.uint32(np.uint32(tile) - lp * np.uint32(TPP))
            page = ldg1s(a5 + np.int64(lp * np.uint32(4)))
            # page_bytes < 2**31: one 32 x 32 -> 64-bit multiply
            po = np.int64(page) * np.int64(np.int32(a6))
            copy_tile(sl, lane, lt, np.uint32(lt >> LTPG), (tile & (TPG - 1)) == 0, a0 + po,
                      a1 + po, a2 + po, a3 + po, a4 + po)

    @cuda.jit(device=True)
    def tile_of(tb32, w32, step):
        """The tile of this warp's step ``step`` (int32; the split starts at tile ``tb32``, token
        lane ``w32`` takes key groups w, w + TL, ...). The casts keep the arithmetic 32-bit:
        Numba's ints are int64, and the loop bookkeeping in 64-bit pairs cost about 20
        instructions per tile."""
        grp = np.int32(np.int32(step >> LTPG) * TL + w32)
        return np.int32(tb32 + np.int32(grp << LTPG) + np.int32(step & (TPG - 1)))

    @cuda.jit(device=True)
    def pv_block(kb, so, psh_b, pl0, g, t4, lane, gv, vpw, bv, vx, acc, e0, e1, e2, e3):
        """PV of 16-token block kb (called with literal 0 and 1, so that after inlining every
        offset below is an immediate): B = P * value scales, the E (min-term) mma, and one mma
        per 16-channel chunk on this lane's value words. Returns the updated (e0, e1, e2, e3)."""
        xo = 16 * kb + t4
        # P of row g, tokens xo + 4 i (swizzled positions)
        p01 = pack_f16x2(lds1f(psh_b, pl0 + 16 * ((4 * kb) ^ g)),
                         lds1f(psh_b, pl0 + 16 * ((4 * kb + 1) ^ g)))
        p23 = pack_f16x2(lds1f(psh_b, pl0 + 16 * ((4 * kb + 2) ^ g)),
                         lds1f(psh_b, pl0 + 16 * ((4 * kb + 3) ^ g)))
        # value params of block kb (docs/format.md, "Value param tiles"): this lane's scales
        # are 2 NGV consecutive words, word 2 j + pair = the scales of tokens xo + 8 pair and
        # xo + 8 pair + 4 of group j (an f16x2 like p01 / p23: no PRMT), and its mins of group
        # gv the 2 words 8 NGV further
        sb_ = 4 * (VPO + kb * 16 * NGV + t4 * 2 * NGV)
        load_vscales(so, sb_, vpw)
        for j in range(NGV):
            bv[2 * j] = hmul2(p01, vpw[2 * j])
            bv[2 * j + 1] = hmul2(p23, vpw[2 * j + 1])
        # E += P (rows x tokens) . M (tokens x groups), M = the value mins of group gv. The
        # mma's rows 8-15 (A rows zero) accumulate into e2, e3, which are never read: carried
        # rather than re-zeroed, they saved ptxas 6 register moves per tile
        # (lanes g >= NGV read group NGV - 1 again: they feed only E's columns g >= NGV, which
        # the epilogue never reads, so they need no zeroing)
        wa, wb = lds2(so, sb_ + 4 * (8 * NGV + 2 * gv))
        e0, e1, e2, e3 = mma_f16(p01, ZERO_U, p23, ZERO_U, wa, wb, e0, e1, e2, e3)
        # value codes of the 4 tokens: this lane's own words, M rows g, g + 8 of chunk
        # ch = slots ch, NCH + ch; K pairs = token pairs 0, 1
        load_vcodes(so, 4 * (VCO + (kb * 32 + lane) * NVX), vx)
        for ch in range(NCH):
            j = (16 * ch) // GV
            acc[4 * ch], acc[4 * ch + 1], acc[4 * ch + 2], acc[4 * ch + 3] = mma_f16(
                vcodes(vx, 0, ch), vcodes(vx, 0, NCH + ch),
                vcodes(vx, 1, ch), vcodes(vx, 1, NCH + ch),
                bv[2 * j], bv[2 * j + 1],
                acc[4 * ch], acc[4 * ch + 1], acc[4 * ch + 2], acc[4 * ch + 3])
        return e0, e1, e2, e3

    if RG == 1:
        @cuda.jit(device=True)
        def lane_sync(ident):
            """The warps of a token lane meet (one warp: a syncwarp)."""
            cuda.syncwarp()
    else:
        @cuda.jit(device=True)
        def lane_sync(ident):
            """The RG warps of a token lane meet at named barrier ``ident``."""
            bar_sync(ident, NLT)

    def split_body(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, ws_max,
                   ws_sum, ws_acc, scale, quantized_len, residual_len, num_splits, res_blocks,
                   out, lse, counter, fuse, lengths, block_table):
        tid = cuda.threadIdx.x
        # 32-bit lane coordinates: Numba's ints are int64, and ptxas, short of registers,
        # recomputes lane-derived values inside the tile loop (in 64 bits, every test like
        # ``lane & 8`` was two compares and every offset a 64-bit pair)
        lane = np.int32(tid & 31)
        warp = np.int32(tid >> 5)
        g = np.int32(lane >> 2)
        t4 = np.int32(lane & 3)
        # block rows 0 .. res_blocks - 1: the residual blocks (none without RESIDUAL)
        if RB == 1:
            bx = cuda.blockIdx.x
            R0 = 0
        else:  # x = (b H + kvh) RB + rbk: the RB blocks of a split are adjacent
            bx = cuda.blockIdx.x // RB
            R0 = np.int32(np.int32(cuda.blockIdx.x % RB) * ROWS)
        b, kvh, split, t_begin, t_end = split_block(bx, k_codes.shape[1], quantized_len,
                                                    num_splits, TPG,
                                                    res_blocks if RESIDUAL else 0)
        # this row's lengths (the host's are bounds): packed tiles up to its own, from the key
        # group of its first visible token
        row_ql = np.int32(lengths[b, LEN_QUANTIZED])
        seq_len = row_ql + np.int32(lengths[b, LEN_RESIDUAL])
        first = np.int32(lengths[b, LEN_START])
        t_end = min(t_end, row_ql // TILE)
        t_begin = max(t_begin, first // (TILE * TPG) * TPG)
        nh = kvh if NORM_PER_HEAD else 0
        neg_inf = np.float32(-math.inf)
        stage = cuda.shared.array((NW, NSW), np.uint32, alignment=ALIGN16)
        qs = cuda.shared.array((QR, DP), np.float32, alignment=ALIGN16)
        qmax = cuda.shared.array(QR, np.float32)
        psh = cuda.shared.array((NW, 8, 32), np.float32)  # XOR-swizzled (see ps0, ps1, pl0)
        bsh = cuda.shared.array((NW, 8, BS), np.uint32, alignment=ALIGN16)  # 8-byte reads
        esh = cuda.shared.array((NW, 8, 8), np.float32)
        mw = cuda.shared.array((NW, 8), np.float32)
        lw = cuda.shared.array((NW, 8), np.float32)
        wgt = cuda.shared.array((NW, 8), np.float32)  # the epilogue's per-warp row weights
        gbase = cuda.shared.array((NW, 8), np.int64)
        flag = cuda.shared.array(1, np.int32)  # the fused merge: this block arrived last
        nres_blocks = res_blocks if RESIDUAL else 0
        arrivals = (num_splits + nres_blocks) * RB  # every block of (b, kvh) counts
        res_slot = 1 if nres_blocks > 0 else 0
        if RESIDUAL and split < 0:  # block-uniform
            # residual block index over the head's blocks: row blocks take res_blocks each
            rres = cuda.blockIdx.y if RB == 1 else np.int32(
                np.int32(cuda.blockIdx.x % RB) * res_blocks + cuda.blockIdx.y)
            if RB == 1 or rres < NRES:
                residual(q, k_res, v_res, ws_max, ws_sum, ws_acc, scale, row_ql,
                         seq_len - row_ql, b, kvh, rres, num_splits, qs,
                         shared_address(stage, (0, 0)), first)
            if FUSED and fuse != 0:
                finish(ws_max, ws_sum, ws_acc, out, lse, counter, b, kvh, num_splits, res_slot,
                       arrivals, flag, shared_address(stage, (0, 0)))
            return
        if t_begin >= t_end:  # block-uniform
            write_empty_split(ws_max, ws_sum, ws_acc, b, kvh, split, tid, NT, ROWS, D, G, LQ,
                              R0)
            if FUSED and fuse != 0:
                finish(ws_max, ws_sum, ws_acc, out, lse, counter, b, kvh, num_splits, res_slot,
                       arrivals, flag, shared_address(stage, (0, 0)))
            return
        # this warp's token lane tl and first row rb (row groups 1: tl = warp, rb = 0)
        tl = warp if RG == 1 else np.int32(warp // RG)
        rb = np.int32(0) if RG == 1 else np.int32(ROWS_PER_WARP * (warp % RG))
        issuer = RG == 1 or rb == 0  # the warp that copies its token lane's tiles
        stg = stage[warp]  # this warp's stage: NSTAGE buffers of SW words (or its lane's share)
        # its token lane's buffers (row groups: the stage rows of the lane's RG warps)
        sb = shared_address(stage, (warp if RG == 1 else np.int32(tl * RG), 0))
        qs_b = shared_address(qs, (rb, 0))  # this warp's first query row
        psh_b = shared_address(psh, (warp, 0, 0))
        bsh_b = shared_address(bsh, (warp, 0, 0))

        # this warp's tiles: key groups tl, tl + TL, ... of the split
        groups = (t_end - t_begin) // TPG
        mine = (groups - tl + TL - 1) // TL if tl < groups else 0
        nsteps = mine * TPG
        sl = sb + 16 * lane
        gb = gbase[warp]
        if PAGED and lane == 0:  # page 0's slices; prefetch adds page * page_bytes
            gb[0] = global_address(k_codes, (0, kvh, 0, 0, 0))
            gb[1] = global_address(norms, (0, nh, 0)) if SCALE_TOKENS else gb[0]
            gb[2] = global_address(k_params, (0, kvh, 0, 0, 0))
            gb[3] = global_address(v_params, (0, kvh, 0, 0, 0))
            gb[4] = global_address(v_codes, (0, kvh, 0, 0))
            gb[5] = global_address(block_table, (b, 0))
            gb[6] = np.int64(k_codes.strides[0])
        elif lane == 0:
            gb[0] = global_address(k_codes, (b, kvh, 0, 0, 0))
            gb[1] = global_address(norms, (b, nh, 0)) if SCALE_TOKENS else gb[0]
            gb[2] = global_address(k_params, (b, kvh, 0, 0, 0))
            gb[3] = global_address(v_params, (b, kvh, 0, 0, 0))
            gb[4] = global_address(v_codes, (b, kvh, 0, 0))
        cuda.syncwarp()
        if nsteps > 0 and issuer:  # start the first tile's copies before the query prologue
            prefetch(sl, lane, t_begin + tl * TPG, gb)
            if NSTAGE == 4:  # (row groups) and the next two tiles'
                for j in range(1, 3):
                    if j < nsteps:
                        prefetch(sl + 4 * SW * j, lane,
                                 tile_of(np.int32(t_begin), np.int32(tl), np.int32(j)), gb)

        # --- prologue (block): rotated, scaled queries, normalized per row by max |.| ---------
        qx = cuda.local.array(CQ, np.float32)
        for idx in range(lane, (8 - LR) * BS, 32):  # padding rows of the fragment buffer
            bsh[warp, LR + idx // BS, idx % BS] = ZERO_U
        if QR > ROWS:  # padding rows of the last row group (a constant test: tid may be < 0 to
            for idx in range(tid, (QR - ROWS) * DP, NT):  # LLVM, so an empty range stays)
                qs[ROWS + idx // DP, idx % DP] = ZERO_F
                if idx % DP == 0:
                    qmax[ROWS + idx // DP] = np.float32(1.0)
        # a warp per row, CQ consecutive channels per lane, rotated in registers and shuffles
        # (fwht_warp: bit for bit the reference's transform; fwht_shared took about 2,300
        # cycles of barriers at B=1), then the scale and the row's max |.|
        qfac = scale * HS if ROTATE else scale
        for r in range(warp, ROWS, NW):
            gr = R0 + r  # the global row
            for k in range(CQ):
                qx[k] = load_q(q[b, kvh * G + gr // LQ, gr % LQ, lane * CQ + k])
            if ROTATE:
                fwht_row(qx, lane)
            mx = ZERO_F
            for k in range(CQ):
                v = qx[k] * qfac
                qx[k] = v
                mx = max(mx, abs(v))
            for off in (16, 8, 4, 2, 1):
                mx = max(mx, cuda.shfl_xor_sync(FULL, mx, off))
            if not mx > ZERO_F:  # zero query row (a NaN row stays NaN through qs)
                mx = np.float32(1.0)
            for k in range(CQ):
                qs[r, lane * CQ + k] = qx[k] / mx
            if lane == 0:
                qmax[r] = mx
        cuda.syncthreads()
        # permute each row into the fragment-build order: position (jj*32 + lane)*4 + k holds the
        # channel that lane's chunk g + 8 jj takes as k-th value (one 16-byte read per row)
        qt = cuda.local.array(NQP, np.float32)
        for u in range(NQP):
            idx = tid + u * NT
            if (ROWS * D) % NT == 0 or idx < ROWS * D:
                pos = idx % D
                pl = (pos >> 2) & 31
                ch = (pl >> 2) + 8 * (pos >> 7)
                cb = ((pl & 3) * KWT + (2 * ch) // KHP) * KCPW + (2 * ch) % KHP
                qt[u] = qs[idx // D, cb + (pos & 1) + ((pos >> 1) & 1) * KHP]
        cuda.syncthreads()
        for u in range(NQP):
            idx = tid + u * NT
            if (ROWS * D) % NT == 0 or idx < ROWS * D:
                qs[idx // D, idx % D] = qt[u]
        cuda.syncthreads()

        # --- per-thread constants of the fragment maps ----------------------------------------
        r0 = 2 * t4
        r1 = r0 + 1
        # the score tile psh[row R][token T] sits at R*32 + (T ^ s(R)), s(R) = ((R & 7) << 2) |
        # ((R >> 1) & 3): both the QK-side stores (rows 2t4, 2t4 + 1, tokens 4g + i) and the
        # PV-side loads (row g, tokens 16kb + 4i + t4) then hit 32 different banks
        ps0 = 4 * (r0 * 32 + ((g ^ r0) << 2))
        ps1 = 4 * (r1 * 32 + ((g ^ r1) << 2))
        pl0 = 4 * (g * 32 + (t4 ^ ((g >> 1) & 3)))
        lim0 = seq_len - LQ + (R0 + rb + r0) % LQ  # last visible position of rows r0, r1
        lim1 = seq_len - LQ + (R0 + rb + r1) % LQ
        gq = min(g, ROWS - 1) if RG == 1 else rb + g
        gv = min(g, NGV - 1)

        m0 = neg_inf
        m1 = neg_inf
        mu0 = ZERO_F  # the running max as subtracted from the scores: m, or 0 while m is -inf
        mu1 = ZERO_F
        l0 = ZERO_F
        l1 = ZERO_F
        e0 = ZERO_F
        e1 = ZERO_F
        e2 = ZERO_F
        e3 = ZERO_F
        f0 = ZERO_F
        f1 = ZERO_F
        k0 = ZERO_F
        k1 = ZERO_F
        acc = cuda.local.array(NACC, np.float32)
        for i in range(NACC):
            acc[i] = ZERO_F
        bq = cuda.local.array(NBQ, np.uint32)
        kp = cuda.local.array(8, np.float32)
        sc = cuda.local.array(8, np.float32)
        vpw = cuda.local.array(NVPS, np.uint32)
        bv = cuda.local.array(NBV, np.uint32)
        vx = cuda.local.array(NVX, np.uint32)

        # the tile loop's bookkeeping in 32-bit (tile_of)
        nsteps32 = np.int32(nsteps)
        tb32 = np.int32(t_begin)
        w32 = np.int32(tl)
        # a tile starting past this token holds one that some row must not see (causal edge)
        edge32 = np.int32(seq_len - LQ - TILE + 1)
        step = np.int32(0)
        while step < nsteps32:  # a range loop kept Numba's 64-bit trip count: 6 more per tile
            tile = tile_of(tb32, w32, step)
            buf = step & (NSTAGE - 1)
            if not issuer:
                pass
            elif NSTAGE == 1:
                if step > 0:
                    prefetch(sl, lane, tile, gb)
                cp_async_wait0()
            elif NSTAGE == 4:  # (row groups) tiles step + 1 .. step + 3 in flight
                nxt = np.int32(step + 3)
                if nxt < nsteps32:
                    prefetch(sl + 4 * SW * (nxt & 3), lane, tile_of(tb32, w32, nxt), gb)
                    cp_async_wait3()
                elif np.int32(step + 2) < nsteps32:
                    cp_async_wait2()
                elif np.int32(step + 1) < nsteps32:
                    cp_async_wait1()
                else:
                    cp_async_wait0()
            elif np.int32(step + 1) < nsteps32:  # the next tile's copies fly meanwhile
                nxt = np.int32(step + 1)
                prefetch(sl + 4 * SW * (1 - buf), lane,
                         tile_of(tb32, w32, nxt), gb)
                cp_async_wait1()
            else:
                cp_async_wait0()
            lane_sync(1 + tl)  # every lane's copies of this tile are visible
            so = sb + 4 * SW * buf  # .shared byte address of this tile's buffer

            # (1) new key group: query fragments b = f16(qn * s / S), constants F_r, K_r
            if (step & (TPG - 1)) == 0:
                # this lane's 4 channels of each of its chunks: (scale, min) words, loaded once
                pw = cuda.local.array(NPW, np.uint32)
                smx = ZERO_U
                for jj in range(NCHI):
                    ch = g + 8 * jj
                    if NCH % 8 == 0 or ch < NCH:
                        cb = (t4 * KWT + (2 * ch) // KHP) * KCPW + (2 * ch) % KHP
                        cp = cb + KP_PAD * t4  # padded stage position (cb is in quarter t4)
                        w0, w1 = lds2(so, 4 * (KPO + cp))
                        w2, w3 = lds2(so, 4 * (KPO + cp + KHP))
                        pw[4 * jj] = w0
                        pw[4 * jj + 1] = w1
                        pw[4 * jj + 2] = w2
                        pw[4 * jj + 3] = w3
                        smx = umax32(smx, umax32(umax32(w0 & ABS16, w1 & ABS16),
                                                 umax32(w2 & ABS16, w3 & ABS16)))
                # max |s| of the key group over the warp, as float16 bits (ordered like the
                # values: one redux.sync instead of 5 shuffles and maxima; a NaN scale is the
                # largest and gives S = 1 below, and its channel's b' stays NaN)
                smax = f16x2_lo(redux_max_u32(smx))
                # 1 / S rounded down to a power of two (S * inv_s in [0.5, 1)): exact, no
                # division; a zero or subnormal S (all-constant groups) uses 1
                ex = (float_as_uint(smax) >> np.uint32(23)) & np.uint32(0xFF)
                inv_s = np.float32(1.0)
                s_up = np.float32(1.0)  # S = 1 / inv_s, also a power of two (no division)
                if ex > np.uint32(0) and ex < np.uint32(253):
                    inv_s = uint_as_float((np.uint32(253) - ex) << np.uint32(23))
                    s_up = uint_as_float((ex + np.uint32(1)) << np.uint32(23))
                for r in range(8):  # rows < LR are set by the first chunk below
                    if NCH % 8 != 0 or r >= LR:
                        kp[r] = ZERO_F
                for jj in range(NCHI):
                    ch = g + 8 * jj
                    if NCH % 8 == 0 or ch < NCH:
                        # mma ch takes pairs 2ch, 2ch + 1 of lane column t4's words
                        jp = (2 * ch) % KHP
                        cb = (t4 * KWT + (2 * ch) // KHP) * KCPW + jp
                        w0 = pw[4 * jj]
                        w1 = pw[4 * jj + 1]
                        w2 = pw[4 * jj + 2]
                        w3 = pw[4 * jj + 3]
                        # channels cb (pair 2t4, half 0), cb + 1 (2t4 + 1, 0), cb + KHP (2t4, 1),
                        # cb + KHP + 1 (2t4 + 1, 1)
                        s0 = f16x2_lo(w0)
                        s1 = f16x2_lo(w1)
                        s2 = f16x2_lo(w2)
                        s3 = f16x2_lo(w3)
                        d0 = f16x2_hi(w0)
                        d1 = f16x2_hi(w1)
                        d2 = f16x2_hi(w2)
                        d3 = f16x2_hi(w3)
                        # inv_s * KFAC[jp], KFAC[jp + 1] from their exponent fields (jp
                        # depends on g: a tuple lookup was a branch tree of 25 instructions)
                        pa = (KPOS >> np.uint32(4 * jp)) & np.uint32(15)
                        pb = (KPOS >> np.uint32(4 * jp + 4)) & np.uint32(15)
                        fa = inv_s * uint_as_float((KEXP - pa) << np.uint32(23))
                        fb = inv_s * uint_as_float((KEXP - pb) << np.uint32(23))
                        s0 *= fa
                        s1 *= fb
                        s2 *= fa
                        s3 *= fb
                        fo = 4 * (ch * 8 + 2 * t4)
                        qo = 16 * (jj * 32 + lane)  # this lane's 4 values, permuted above
                        for r in range(LR):
                            qa, qb, qc, qd = lds4f(qs_b, 4 * r * DP + qo)
                            sts2(bsh_b, 4 * r * BS + fo, pack_f16x2(qa * s0, qc * s2),
                                 pack_f16x2(qb * s1, qd * s3))
                            t = qa * d0 + qb * d1 + qc * d2 + qd * d3
                            if NCH % 8 == 0 and jj == 0:
                                kp[r] = t
                            else:
                                kp[r] += t
                # transpose-reduce the row partials over the warp: lanes (g, *) get row g (row
                # g & 3 with at most 4 rows: rows 4-7 are zero and skip the first halving)
                if LR > 4:
                    up = (lane & 16) != 0
                    for i in range(4):
                        lo = kp[i]
                        hi = kp[i + 4]
                        kp[i] = (hi if up else lo) + cuda.shfl_xor_sync(FULL, lo if up else hi,
                                                                         16)
                up = (lane & 8) != 0
                for i in range(2):
                    lo = kp[i]
                    hi = kp[i + 2]
                    kp[i] = (hi if up else lo) + cuda.shfl_xor_sync(FULL, lo if up else hi, 8)
                up = (lane & 4) != 0
                ksum = (kp[1] if up else kp[0]) + cuda.shfl_xor_sync(
                    FULL, kp[0] if up else kp[1], 4)
                if LR <= 4:
                    ksum += cuda.shfl_xor_sync(FULL, ksum, 16)
                ksum += cuda.shfl_xor_sync(FULL, ksum, 2)
                ksum += cuda.shfl_xor_sync(FULL, ksum, 1)
                qm = qmax[gq] * LOG2E  # scores in log2 units: the softmax uses ex2
                kr = qm * ksum
                fr = QK_UNIT * qm * s_up  # = QK_UNIT * qm / inv_s exactly (powers of two)
                k0 = cuda.shfl_sync(FULL, kr, 4 * r0)
                k1 = cuda.shfl_sync(FULL, kr, 4 * r1)
                f0 = cuda.shfl_sync(FULL, fr, 4 * r0)
                f1 = cuda.shfl_sync(FULL, fr, 4 * r1)
                # padding rows (>= ROWS): their B rows are zero, so c = 0 and the score
                # (0 * c - inf) * n = -inf: masked for the whole group without per-tile selects
                if not FULLGROUPS:  # (a constant test)
                    if rb + r0 >= ROWS:
                        k0 = neg_inf
                        f0 = ZERO_F
                    if rb + r1 >= ROWS:
                        k1 = neg_inf
                        f1 = ZERO_F
                cuda.syncwarp()
                for ch in range(NCH):  # rows >= ROWS read the zero rows of bsh
                    u0, u1 = lds2(bsh_b, 4 * (g * BS + ch * 8 + 2 * t4))
                    bq[2 * ch] = u0
                    bq[2 * ch + 1] = u1

            # (2) QK on tensor cores: 16 tokens x 8 rows per mma block
            c0 = ZERO_F
            c1 = ZERO_F
            c2 = ZERO_F
            c3 = ZERO_F
            c4 = ZERO_F
            c5 = ZERO_F
            c6 = ZERO_F
            c7 = ZERO_F
            for i in range(KWT):  # word t4 KWT + i of tokens 4g .. 4g + 3: one 16-byte load
                x0, x1, x2, x3 = lds4(so, 4 * (KC + (t4 * KWT + i) * 32 + 4 * g))
                for jj in range(KHP // 2):
                    j = 2 * jj
                    ch = (i * KHP + j) // 2
                    c0, c1, c2, c3 = mma_f16(kcodes(x0, j), kcodes(x1, j), kcodes(x0, j + 1),
                                             kcodes(x1, j + 1), bq[2 * ch], bq[2 * ch + 1],
                                             c0, c1, c2, c3)
                    c4, c5, c6, c7 = mma_f16(kcodes(x2, j), kcodes(x3, j), kcodes(x2, j + 1),
                                             kcodes(x3, j + 1), bq[2 * ch], bq[2 * ch + 1],
                                             c4, c5, c6, c7)
            if SCALE_TOKENS:
                n0, n1, n2, n3 = lds4f(so, 4 * (NRM + 4 * g))
            else:
                n0 = n1 = n2 = n3 = np.float32(1.0)
            tok = np.int32(np.int32(tile * TILE) + np.int32(4 * g))
            # scores less the running max, sc[2 i + h]: token tok + i, row r0 + h (the
            # subtraction fused into the multiply by the norm: two FFMA per score)
            sc[0] = (f0 * c0 + k0) * n0 - mu0
            sc[1] = (f1 * c1 + k1) * n0 - mu1
            sc[2] = (f0 * c2 + k0) * n1 - mu0
            sc[3] = (f1 * c3 + k1) * n1 - mu1
            sc[4] = (f0 * c4 + k0) * n2 - mu0
            sc[5] = (f1 * c5 + k1) * n2 - mu1
            sc[6] = (f0 * c6 + k0) * n3 - mu0
            sc[7] = (f1 * c7 + k1) * n3 - mu1
            # a causal-edge tile, or one before the row's first visible token (warp-uniform)
            if np.int32(tile * TILE) > edge32 or np.int32(tile * TILE) < first:
                for i in range(4):
                    if not ((FULLGROUPS or rb + r0 < ROWS) and tok + i <= lim0
                            and tok + i >= first):
                        sc[2 * i] = neg_inf
                    if not ((FULLGROUPS or rb + r1 < ROWS) and tok + i <= lim1
                            and tok + i >= first):
                        sc[2 * i + 1] = neg_inf

            # (3) online softmax for rows r0, r1 (the 8 lanes of a column t4 hold the 32 tokens)
            # plain max (one FMNMX, which drops NaN): a NaN score still reaches its row's output,
            # since its weight exp(NaN - m) is NaN and enters both l and the PV accumulators
            mt0 = max(max(sc[0], sc[2]), max(sc[4], sc[6]))
            mt1 = max(max(sc[1], sc[3]), max(sc[5], sc[7]))
            # the warp's max and the rescale only when some lane's score passes its row's running
            # max (one vote; rare after the first tiles): score - mu > m - mu, which is 0, or -inf
            # for a row with no visible token yet. Otherwise the warp max is <= m (to a rounding
            # of the fused subtraction: then a weight may be 1 + 2**-23), the new max is m and
            # alpha exactly 1
            if cuda.any_sync(FULL, mt0 > m0 - mu0 or mt1 > m1 - mu1):
                for off in (4, 8, 16):
                    mt0 = max(mt0, cuda.shfl_xor_sync(FULL, mt0, off))
                    mt1 = max(mt1, cuda.shfl_xor_sync(FULL, mt1, off))
                mn0 = max(m0, mt0 + mu0)
                mn1 = max(m1, mt1 + mu1)
                # a row with no visible token yet (max -inf) keeps alpha = 1 (-inf - -inf would
                # be NaN); a row's first visible tile has alpha = ex2(-inf) = 0
                al0 = np.float32(1.0)
                al1 = np.float32(1.0)
                if mn0 != neg_inf:
                    al0 = ex2(m0 - mn0)
                if mn1 != neg_inf:
                    al1 = ex2(m1 - mn1)
                # re-base the scores on the new max (a masked -inf stays -inf, a NaN NaN)
                nu0 = mn0 if mn0 != neg_inf else ZERO_F
                nu1 = mn1 if mn1 != neg_inf else ZERO_F
                d0 = mu0 - nu0
                d1 = mu1 - nu1
                for i in range(4):
                    sc[2 * i] += d0
                    sc[2 * i + 1] += d1
                m0 = mn0
                m1 = mn1
                mu0 = nu0
                mu1 = nu1
                l0 *= al0
                l1 *= al1
                # alpha != alpha: a NaN must propagate; multiplying by an alpha of 1 is exact
                for ch in range(NCH):
                    acc[4 * ch] *= al0
                    acc[4 * ch + 1] *= al1
                    acc[4 * ch + 2] *= al0
                    acc[4 * ch + 3] *= al1
                # E rows are g: fetch alpha of row g from a lane holding it (t4 = g // 2)
                a_0 = cuda.shfl_sync(FULL, al0, g >> 1)
                a_1 = cuda.shfl_sync(FULL, al1, g >> 1)
                ag = a_1 if g & 1 else a_0
                e0 *= ag
                e1 *= ag
            # ex2(-inf) = 0: a masked score needs no branch
            for i in range(4):
                sc[2 * i] = ex2(sc[2 * i])
                sc[2 * i + 1] = ex2(sc[2 * i + 1])
            l0 += (sc[0] + sc[2]) + (sc[4] + sc[6])
            l1 += (sc[1] + sc[3]) + (sc[5] + sc[7])
            for i in range(4):  # token 4g + i of rows r0, r1 (swizzled: no bank conflicts)
                sts1f(psh_b, ps0 + 4 * (i ^ t4), sc[2 * i])
                sts1f(psh_b, ps1 + 4 * (i ^ t4), sc[2 * i + 1])
            cuda.syncwarp()

            # (4) PV on tensor cores, two blocks of 16 tokens; the thread's tokens of block kb
            # are 16 kb + t4 + 4 i (i = 0..3)
            e0, e1, e2, e3 = pv_block(0, so, psh_b, pl0, g, t4, lane, gv, vpw, bv, vx, acc,
                                      e0, e1, e2, e3)
            e0, e1, e2, e3 = pv_block(1, so, psh_b, pl0, g, t4, lane, gv, vpw, bv, vx, acc,
                                      e0, e1, e2, e3)
            lane_sync(1 + tl)  # this buffer and psh are consumed before they are refilled
            step = np.int32(step + 1)

        # --- per-warp results to shared memory (the stage is free now) ------------------------
        for off in (4, 8, 16):
            l0 += cuda.shfl_xor_sync(FULL, l0, off)
            l1 += cuda.shfl_xor_sync(FULL, l1, off)
        # a NaN score leaves the running max as it was (max drops NaN) but makes l NaN: report
        # max = NaN too, or the merge would take a warp that saw only NaN scores for empty
        if l0 != l0:
            m0 = l0
        if l1 != l1:
            m1 = l1
        esh[warp, g, 2 * t4] = e0
        esh[warp, g, 2 * t4 + 1] = e1
        cuda.syncwarp()
        for ch in range(NCH):
            j = (16 * ch) // GV
            clo = 16 * ch + g  # M row g (slot ch), M row g + 8 (slot NCH + ch)
            chi = clo + 8
            flo = VFAC[ch % VHC]
            fhi = VFAC[(NCH + ch) % VHC]
            if FULLGROUPS or rb + r0 < ROWS:
                ej = esh[warp, r0, j]
                stg[r0 * D + clo] = float_as_uint(acc[4 * ch] * flo + ej)
                stg[r0 * D + chi] = float_as_uint(acc[4 * ch + 2] * fhi + ej)
            if FULLGROUPS or rb + r1 < ROWS:
                ej = esh[warp, r1, j]
                stg[r1 * D + clo] = float_as_uint(acc[4 * ch + 1] * flo + ej)
                stg[r1 * D + chi] = float_as_uint(acc[4 * ch + 3] * fhi + ej)
        if g == 0:
            mw[warp, r0] = m0
            mw[warp, r1] = m1
            lw[warp, r0] = l0
            lw[warp, r1] = l1
        cuda.syncthreads()

        # --- merge the 4 warps by log-sum-exp and write the split's partials --------------------
        if RG == 1:
            # one thread per (warp, row) computes the warp's weight exp2(m_w - max_w m_w) (0 for a
            # warp that saw no token of the row; NaN when some warp's max is NaN)
            if tid < NW * ROWS:
                w = tid // ROWS
                r = tid % ROWS
                mm = neg_inf
                for u in range(NW):
                    mm = nanmax(mm, mw[u, r])
                wt = ZERO_F
                if mm != neg_inf and mw[w, r] != neg_inf:
                    wt = ex2(mw[w, r] - mm)
                wgt[w, r] = wt
            cuda.syncthreads()
            for idx in range(tid, ROWS * D, NT):
                r = idx // D
                a = ZERO_F
                for w in range(NW):
                    a += uint_as_float(stage[w, idx]) * wgt[w, r]
                gr = R0 + r
                ws_acc[b, kvh * G + gr // LQ, gr % LQ, split, idx % D] = a
            if tid < ROWS:
                gr = R0 + tid
                mm = neg_inf
                for w in range(NW):
                    mm = nanmax(mm, mw[w, tid])
                s = ZERO_F
                if mm != neg_inf:
                    for w in range(NW):
                        if mw[w, tid] != neg_inf:
                            s += lw[w, tid] * ex2(mw[w, tid] - mm)
                ws_max[b, kvh * G + gr // LQ, gr % LQ, split] = mm * LN2  # natural log units
                ws_sum[b, kvh * G + gr // LQ, gr % LQ, split] = s
        else:
            # row groups: row r is row r % 8 of warp u RG + r // 8 of each token lane u
            if tid < TL * ROWS:
                rr = tid % ROWS
                lr = rr % ROWS_PER_WARP
                wr = (tid // ROWS) * RG + rr // ROWS_PER_WARP
                mm = neg_inf
                for u in range(TL):
                    mm = nanmax(mm, mw[u * RG + rr // ROWS_PER_WARP, lr])
                wt = ZERO_F
                if mm != neg_inf and mw[wr, lr] != neg_inf:
                    wt = ex2(mw[wr, lr] - mm)
                wgt[wr, lr] = wt
            cuda.syncthreads()
            for idx in range(tid, ROWS * D, NT):
                rr = idx // D
                lr = rr % ROWS_PER_WARP
                a = ZERO_F
                for u in range(TL):
                    wr = u * RG + rr // ROWS_PER_WARP
                    a += uint_as_float(stage[wr, lr * D + idx % D]) * wgt[wr, lr]
                gr = R0 + rr
                ws_acc[b, kvh * G + gr // LQ, gr % LQ, split, idx % D] = a
            if tid < ROWS:
                gr = R0 + tid
                lr = tid % ROWS_PER_WARP
                mm = neg_inf
                for u in range(TL):
                    mm = nanmax(mm, mw[u * RG + tid // ROWS_PER_WARP, lr])
                s = ZERO_F
                if mm != neg_inf:
                    for u in range(TL):
                        wr = u * RG + tid // ROWS_PER_WARP
                        if mw[wr, lr] != neg_inf:
                            s += lw[wr, lr] * ex2(mw[wr, lr] - mm)
                ws_max[b, kvh * G + gr // LQ, gr % LQ, split] = mm * LN2  # natural log units
                ws_sum[b, kvh * G + gr // LQ, gr % LQ, split] = s
        if FUSED and fuse != 0:  # (its first barrier also ends this block's use of the stage)
            finish(ws_max, ws_sum, ws_acc, out, lse, counter, b, kvh, num_splits, res_slot,
                   arrivals, flag, shared_address(stage, (0, 0)))

    # the kernel is the body above, inlined (one device function: NVVM inlines it whole); the
    # paged specialization takes the block table as one more argument, the contiguous kernel
    # passes ``lengths`` in its place (an int32 2-D array, never read there)
    body = cuda.jit(device=True)(split_body)
    if PAGED:
        def split_kernel(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, ws_max,
                         ws_sum, ws_acc, scale, quantized_len, residual_len, num_splits,
                         res_blocks, out, lse, counter, fuse, lengths, block_table):
            body(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, ws_max, ws_sum,
                 ws_acc, scale, quantized_len, residual_len, num_splits, res_blocks, out, lse,
                 counter, fuse, lengths, block_table)

        return split_kernel

    def split_kernel(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, ws_max,
                     ws_sum, ws_acc, scale, quantized_len, residual_len, num_splits, res_blocks,
                     out, lse, counter, fuse, lengths):
        body(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, ws_max, ws_sum,
             ws_acc, scale, quantized_len, residual_len, num_splits, res_blocks, out, lse,
             counter, fuse, lengths, lengths)

    return split_kernel
