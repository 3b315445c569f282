"""Decode attention straight from the packed cache: flash-decoding in two launches (one for
short steps: the v3 split kernel's last blocks merge, attention_fused.py).

Computes exactly :func:`oscar.reference.attention.decode_attention` (SPEC section 5) in float32:

    s_t = scale * n_t * (H q_h) . u_hat_t      quantized token t (H q only with rotate_keys;
                                               n_t = 1 without scale_tokens)
    s_r = scale * q_h . k_r                    residual token r
    p   = softmax over the causally visible tokens (max-subtracted), lse = log sum exp
    out = H (sum_t p_t v_rot_hat_t) + sum_r p_r v_r      (H only with rotate_values)

Query row i of ``q_len`` sits at position ``T - q_len + i`` (T = quantized_len + residual_len)
and sees tokens ``0 .. T - q_len + i``. Query head h reads KV head ``h // G``, G = Hq / H.

Kernel 1, ``split`` (one block per (batch * kv head, split); 128 threads = 4 warps)
    The block takes the G query heads sharing its KV head and all q_len rows together
    (``rows = G * q_len``), so every packed word is read from memory once, and a contiguous
    range of 32-token tiles: ``ceil(tiles / num_splits)`` rounded up to whole key groups, so a
    split always starts a group (trailing splits may be empty).
    It loads its queries once into shared memory, rotates them (``fwht_shared``) and multiplies
    by ``scale``. Per key group it folds the dequantization into the query:
    ``q'_c = q_c * scale_c`` and ``kmin_r = sum_c q_c * min_c``, so that
    ``q . u_hat_t = sum_c q'_c * code_tc + kmin_r`` (one FMA per code and row).
    Per tile:
      QK   thread = (slot = warp, lane = token of the tile). A warp reads word w of its 32 tokens
           as 128 contiguous bytes (the key layout of reference/pack.py). Warps split the rows
           (``RG`` row groups) and, when rows < 4, the key words (``WSPLIT`` word slices); each
           thread unpacks a code once and uses it for all its rows. Partial dots go to shared
           memory and are summed, masked and scaled by n_t in a second pass.
      softmax  online, per row: running max m, sum l, rescale factor alpha (empty rows keep
           m = -inf, l = 0, alpha = 1: no exp(-inf + inf) anywhere).
      PV   the tile's value words (32 token rows, contiguous) and (scale, min) are staged in shared
           memory with coalesced loads; ``ps[r, t, g] = p_rt * vscale_tg`` and
           ``pmin[r, g] = sum_t p_rt * vmin_tg`` fold the value dequantization, so each code
           costs one FMA per row. Thread t owns channels ``t % min(D, 128) + 128 * j`` and rows
           ``t // min(D, 128) + (128 // min(D, 128)) * k``; its accumulators live in registers.
    Writes per (b, hq, i, split): the running max, the sum of exps and the unnormalized rotated
    value sum ``acc[D]`` (float32 workspace). Splits with no visible token write (-inf, 0, 0).
    The v3 kernel (the default) can also run *residual blocks* (attention_residual.py): block
    rows before the splits, one per query row, that score the residual tokens beside the split
    blocks and write their partial (value sum unrotated) at workspace slot ``num_splits``
    (:func:`residual_block_rows` decides per launch).
Kernel 2, ``merge`` (one block per (batch, query head, row); 128 threads)
    Takes the residual blocks' partial when there is one (``res_slot``), else computes the
    residual scores itself (16-byte residual rows shared by the lanes of a row),
    merges the splits and the residual by log-sum-exp (warp-shuffle block reductions), sums the
    splits' ``acc`` (4 channels per lane, splits over the warps), un-rotates once in warp 0's
    registers (``fwht_warp``, rotate_values), adds the residual values and writes ``out``
    (float32 or q's dtype, rounded once) and ``lse`` (natural log). ``_build_merge`` has the
    details.

Shared memory (static, float32 unless noted), kernel 1: queries and pre-scaled queries
``2 * rows * D``; scores ``rows * 32`` plus partials ``WSPLIT * rows * 32``; value words
``32 * D * value_bits / 32`` (uint32); value params ``2 * 32 * D / gv``;
``ps = rows * 32 * D / gv`` (replaced by p * scale on the fly when it does not fit) and ``pmin``;
9.6 KB for Llama-3.1-8B decode (rows 4, D 128). Kernel 2: ``D (1 + 2 * NUM_WARPS) +
residual_length + MAX_SPLITS + 2 * NUM_WARPS`` floats. Kernel 1 takes 7 barriers per tile (8 on
a key group's first tile).

Limits: head_dim a power of two in 32..256; key/value bits 2, 4, 8; key groups 32/64/128; any
value group of the configuration; rows = G * q_len at most 128 and small enough that kernel 1
fits in 48 KB of static shared memory (e.g. G * q_len <= 32 at D = 128, <= 16 at D = 256);
``num_splits <= MAX_SPLITS``. Kernels are specialized by cached factories on the compile-time
parameters (bits, groups, head_dim, G * q_len, dtypes, flags); q_len is part of the key, since
it sets the register and shared-memory layout (decode uses one or a few fixed q_len).

Float32 everywhere; codes become floats with the exponent trick (exact for codes < 2**23) on the
GPU, a plain conversion in the simulator. The simulator has no warp shuffles, so all reductions go
through shared memory and ``syncthreads``. This is the correct, moderately fast v1; known costs
for the performance pass: per-row serial loops over the 32 scores of a tile (max, sum, pmin),
64-bit index arithmetic with Python floor-division semantics, float32 FMAs instead of packed
half2 / dp4a / mma, and merge blocks per query row that re-read the residual.
"""

from __future__ import annotations

import functools
import math

from ._compat import SIMULATOR, cuda, np
from .kernel_cache import jit, launch
from . import attention_mma as _split_v3
from . import attention_fused as _fused
from . import attention_residual as _res
from . import attention_split as _split_v2
from .common import (bf16_bits_to_f32, device_pointer, f32_to_bf16_bits, fwht_shared,
                     fwht_warp, int_as_float, split_block, value_code_location,
                     value_param_location)

if SIMULATOR:
    from .ptx_sim import global_address, ldg4, uint_as_float
else:
    from .ptx import global_address, ldg4, uint_as_float

#: Which split kernel to build. 3 (default) = tensor cores through inline PTX (attention_mma.py;
#: in the CUDA simulator through ptx_sim.py), for the configurations it supports
#: (``attention_mma.unsupported``); the others use v1. 1 = the tile-per-block kernel below
#: (float32; verified on an H200 with compute-sanitizer memcheck/racecheck). 2 = one tile per
#: warp (attention_split.py), float32, kept for comparison. Environment: OSCAR_SPLIT_KERNEL.
SPLIT_VERSION = int(__import__("os").environ.get("OSCAR_SPLIT_KERNEL", "3"))
#: Who scores the residual tokens where the split kernel supports residual blocks
#: (:func:`residual_in_split`): ``"auto"`` (default) extra blocks of the split grid when they
#: fit beside the split blocks in one wave of resident blocks, else every merge block (in a
#: full grid they would push split blocks into a second wave: measured slower, ninth session
#: in benchmarks/RESULTS.md); ``"on"`` / ``"off"`` force one or the other (benchmarks compare
#: them). Environment: OSCAR_RESIDUAL_BLOCKS.
RESIDUAL_BLOCKS = __import__("os").environ.get("OSCAR_RESIDUAL_BLOCKS", "auto")
#: The v3 split kernel's last block of each (batch, KV head) merges (attention_fused.py; one
#: launch per step) where the merge kernel is not needed for the residual tokens. Environment:
#: OSCAR_FUSED_MERGE=0 turns it off (two launches, as before).
FUSED_MERGE = __import__("os").environ.get("OSCAR_FUSED_MERGE", "1") != "0"
#: Fuse only when at most this many blocks feed each (batch, KV head)'s merge: one warp per row
#: reads every partial, and at 62 splits + 4 residual blocks (B=1 32K) that serial chain cost
#: more than the separate merge launch (29.6 vs 27.0 us; ninth session).
FUSED_MAX_ARRIVALS = 32
#: ... and only when the splits are short (at most this many 32-token tiles each): the fused
#: variant's merge code costs the tile loop registers (32 bytes of spills), 8% at B=8 128K
#: (0.338 vs 0.313 ms), while a merge launch saved is about 1 us.
FUSED_MAX_TILES_PER_SPLIT = 8
#: Residual blocks up to this share of one wave get slots of their own (:func:`residual_reserve`).
RESIDUAL_RESERVE = 0.125

#: Threads per block of both kernels: 4 warps, enough to overlap the phases of neighbouring
#: blocks on one SM while keeping the per-tile work per thread large.
NUM_THREADS = 128
WARP_SIZE = 32
NUM_WARPS = NUM_THREADS // WARP_SIZE
#: Tokens per key tile: the packed key layout stores word w of 32 consecutive tokens in 128
#: contiguous bytes (reference/pack.py TILE_TOKENS), read by one warp, lane = token.
TILE_TOKENS = 32
#: Upper bound of num_splits: sizes the merge kernel's weight buffer and keeps gridDim.y small.
MAX_SPLITS = 256
#: A split should stream at least this many tiles (256 tokens), or its fixed cost (query load,
#: rotation, partial write of rows * D floats, one merge term) outweighs its share of the cache.
MIN_TILES_PER_SPLIT = 8
#: Blocks per SM to aim for when splitting: enough resident blocks to cover load latency
#: (a block uses ~10 KB of shared memory and 128 threads, so 4 fit easily).
TARGET_BLOCKS_PER_SM = 4
#: Threads per row of the v1 split kernel's key-group min fold (then one thread sums the
#: partials): fewer barriers than a tree.
REDUCE_FAN = 16
#: 16-byte residual chunks a merge-kernel lane keeps in flight per round (registers: 4 words
#: each for keys and for values). Tests lower it to run the several-rounds path on tiny shapes.
MERGE_LANE_CHUNKS = 16
#: Static shared memory per block that needs no opt-in on any architecture.
SHARED_MEMORY_LIMIT = 48 * 1024
#: float32 2**23: OR-ing a code < 2**23 into its mantissa gives 2**23 + code exactly.
_MAGIC_BITS = 0x4B000000
_MAGIC_FLOAT = 8388608.0

Q_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.int16}
PARAM_DTYPES = {"float16": np.float16, "float32": np.float32}
_SIG_TYPE = {"float16": "float16", "float32": "float32", "bfloat16": "int16"}


# --- device helpers -------------------------------------------------------------------------

if SIMULATOR:

    @cuda.jit(device=True)
    def _code_to_f32(code):
        """An unsigned code as float32 (simulator: plain conversion, same value)."""
        return np.float32(code)

else:

    @cuda.jit(device=True)
    def _code_to_f32(code):
        """An unsigned code < 2**23 as float32 without I2F (quarter rate): a LOP and an FADD."""
        return int_as_float(np.int32(code) | np.int32(_MAGIC_BITS)) - np.float32(_MAGIC_FLOAT)


@cuda.jit(device=True)
def _load_float(x):
    """float16 / float32 element to float32."""
    return np.float32(x)


@cuda.jit(device=True)
def _store_float(x):
    """float32 value for a float16 / float32 array (the store converts: round to nearest even)."""
    return x


def _loader(dtype_name):
    """Device function turning one stored element of ``dtype_name`` into float32."""
    return bf16_bits_to_f32 if dtype_name == "bfloat16" else _load_float


def _storer(dtype_name):
    """Device function turning a float32 into the element stored in an array of
    ``dtype_name`` (bfloat16: int16 bits; float16: the float32 -> float16 conversion, round to
    nearest even; float32: itself)."""
    return f32_to_bf16_bits if dtype_name == "bfloat16" else _store_float


@cuda.jit(device=True)
def _block_max(red, val, tid):
    """Max of ``val`` over the block, returned to every thread: ``shfl_xor`` inside each warp,
    then the NUM_WARPS warp maxima through ``red[NUM_WARPS]`` (shared memory, one barrier).
    Back-to-back calls need distinct ``red`` arrays."""
    off = WARP_SIZE // 2
    while off > 0:
        val = max(val, cuda.shfl_xor_sync(0xFFFFFFFF, val, off))
        off //= 2
    if tid % WARP_SIZE == 0:
        red[tid // WARP_SIZE] = val
    cuda.syncthreads()
    m = red[0]
    for w in range(1, NUM_WARPS):
        m = max(m, red[w])
    return m


@cuda.jit(device=True)
def _block_sum(red, val, tid):
    """Sum of ``val`` over the block, returned to every thread (as :func:`_block_max`)."""
    off = WARP_SIZE // 2
    while off > 0:
        val += cuda.shfl_xor_sync(0xFFFFFFFF, val, off)
        off //= 2
    if tid % WARP_SIZE == 0:
        red[tid // WARP_SIZE] = val
    cuda.syncthreads()
    s = red[0]
    for w in range(1, NUM_WARPS):
        s += red[w]
    return s


def _pow2_ceil(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _hadamard_scale(head_dim):
    """float32(1/sqrt(D)), rounded once as in reference.hadamard.hadamard_scale."""
    return float(np.float32(1.0 / np.sqrt(np.float64(head_dim))))


# --- kernel 1: split ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _split_layout(key_bits, value_bits, key_group_size, value_group_size, head_dim, rows):
    """Compile-time work split of kernel 1 and its shared-memory bytes (see the spec sheet)."""
    d = head_dim
    kw = d * key_bits // 32
    vw = d * value_bits // 32
    ngv = d // value_group_size
    rg = min(NUM_WARPS, _pow2_ceil(rows))  # row groups over the warps (QK)
    wsplit = min(NUM_WARPS // rg, kw)  # key-word slices when rows < 4 (QK)
    dw = min(d, NUM_THREADS)
    lay = dict(
        kw=kw, vw=vw, ngv=ngv, rg=rg, wsplit=wsplit,
        rps=-(-rows // rg), wps=kw // wsplit,
        dw=dw, dpt=d // dw, rs=NUM_THREADS // dw, rpt=-(-rows // (NUM_THREADS // dw)),
        # threads per row summing the key-group min fold (then one thread sums TPR partials)
        tpr=min(NUM_THREADS // _pow2_ceil(rows), REDUCE_FAN) if _pow2_ceil(rows) <= NUM_THREADS
        else 0,
        tpg=key_group_size // TILE_TOKENS,
    )
    base = 4 * (2 * rows * d + rows + NUM_THREADS + (lay["wsplit"] + 1) * rows * TILE_TOKENS
                + TILE_TOKENS * vw + 2 * TILE_TOKENS * ngv + rows * ngv + 3 * rows)
    ps_bytes = 4 * rows * TILE_TOKENS * ngv
    lay["stage_ps"] = base + ps_bytes <= SHARED_MEMORY_LIMIT
    lay["smem"] = base + (ps_bytes if lay["stage_ps"] else 4)
    return lay


def _check_split_fits(lay, rows, head_dim):
    if lay["tpr"] == 0 or lay["smem"] > SHARED_MEMORY_LIMIT:
        raise ValueError(
            f"num_q_heads / num_kv_heads * q_len = {rows} query rows per KV head is too many for "
            f"head_dim {head_dim}: the split kernel would need {lay['smem']} bytes of shared "
            f"memory (limit {SHARED_MEMORY_LIMIT}) or more than {NUM_THREADS} rows; use a smaller "
            "q_len per call"
        )


def _split_signature(param_dtype, q_dtype, res_dtype, out_dtype):
    p, q, r, o = param_dtype, _SIG_TYPE[q_dtype], _SIG_TYPE[res_dtype], _SIG_TYPE[out_dtype]
    return (f"void({q}[:, :, :, ::1], uint32[:, :, :, :, ::1], {p}[:, :, :, :, ::1], "
            f"uint32[:, :, :, ::1], {p}[:, :, :, :, ::1], float32[:, :, ::1], "
            f"{r}[:, :, :, ::1], {r}[:, :, :, ::1], "
            "float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, :, ::1], "
            f"float32, int32, int32, int32, int32, {o}[:, :, :, ::1], float32[:, :, ::1], "
            "int32[:, ::1], int32)")


def residual_in_split(key_bits, value_bits, key_group_size, value_group_size, head_dim, gqa,
                      q_len, param_dtype, q_dtype, rotate_keys, scale_tokens, norm_per_head,
                      res_dtype, residual_length, out_dtype=None, rotate_values=True,
                      fused=False):
    """True when the split kernel of this key can compute the residual partial in extra blocks
    (the v3 kernel, where ``attention_residual.unsupported`` allows it; their scores use the v3
    kernel's staging buffers as scratch). A launch then chooses (:func:`residual_block_rows`):
    with residual blocks the grid has ``attention_residual.blocks_per_head`` more block rows
    and the merge kernel reads the residual's partial from workspace slot ``num_splits``;
    without, the merge kernel scores the residual itself."""
    rows = gqa * q_len
    if not (SPLIT_VERSION == 3 and _split_v3.unsupported(
            key_bits, value_bits, value_group_size, head_dim, rows, param_dtype) is None):
        return False
    words = _split_v3.scratch_words(key_bits, value_bits, value_group_size, head_dim, rows)
    return _res.unsupported(head_dim, residual_length, rows, res_dtype, words) is None


def _build_split(key_bits, value_bits, key_group_size, value_group_size, head_dim, gqa, q_len,
                 param_dtype, q_dtype, rotate_keys, scale_tokens, norm_per_head, res_dtype,
                 residual_length, out_dtype="float32", rotate_values=True, fused=False):
    """Python function and signature of kernel 1 for one compile-time configuration.

    ``SPLIT_VERSION == 3``: the tensor-core kernel (``attention_mma``) where it supports the
    configuration, with the residual blocks of ``attention_residual`` where
    :func:`residual_in_split`; ``== 2``: the v2 kernel (``attention_split``: one tile per warp)
    where its shared memory fits; the v1 kernel below otherwise (docs/kernels.md compares them).
    All take the residual arrays and the fused merge's arguments (only v3 uses them; with
    ``fused``, ``attention_fused``: the last block of each (batch, KV head) merges into ``out``
    and ``lse`` when the launch passes ``fuse = 1``) so that one launch fits all. The fused
    variant is a separate compile: its merge code costs the tile loop registers (B=8 128K 2%
    slower with it), so launches that do not fuse use the plain kernel.
    """
    D, G, LQ = head_dim, gqa, q_len
    ROWS = G * LQ
    sig = _split_signature(param_dtype, q_dtype, res_dtype, out_dtype)
    if SPLIT_VERSION == 3 and _split_v3.unsupported(
            key_bits, value_bits, value_group_size, D, ROWS, param_dtype) is None:
        residual = None
        if residual_in_split(key_bits, value_bits, key_group_size, value_group_size, head_dim,
                             gqa, q_len, param_dtype, q_dtype, rotate_keys, scale_tokens,
                             norm_per_head, res_dtype, residual_length):
            residual = _res.build_residual(D, residual_length, G, LQ, res_dtype,
                                           _loader(q_dtype), D + 4)
        finish = None
        if fused:
            # the merge's weights use the staging buffers as scratch (ample at every supported
            # shape: at least 2,944 words against 1,028; a launch with fuse = 1 must merge)
            need = _fused.scratch_words(MAX_SPLITS + 1)
            have = _split_v3.scratch_words(key_bits, value_bits, value_group_size, D, ROWS)
            if need > have:
                raise ValueError(f"fused merge: {need} words of scratch needed, {have} staged")
            finish = _fused.build_finish(D, G, LQ, rotate_values, _hadamard_scale(D),
                                         _storer(out_dtype), MAX_SPLITS + 1)
        fn = _split_v3.build_split_v3(
            key_bits, value_bits, key_group_size, value_group_size, head_dim, gqa, q_len,
            rotate_keys, scale_tokens, norm_per_head, _loader(q_dtype), _hadamard_scale(D),
            residual, finish)
        return fn, sig
    if SPLIT_VERSION == 2 and _split_v2.fits(ROWS, D):
        fn = _split_v2.build_split_v2(
            key_bits, value_bits, key_group_size, value_group_size, head_dim, gqa, q_len,
            rotate_keys, scale_tokens, norm_per_head, _loader(q_dtype), _code_to_f32,
            _hadamard_scale(D))
        return fn, sig
    lay = _split_layout(key_bits, value_bits, key_group_size, value_group_size, head_dim, ROWS)
    _check_split_fits(lay, ROWS, head_dim)
    VW, NGV = lay["vw"], lay["ngv"]
    RG, WSPLIT, RPS, WPS = lay["rg"], lay["wsplit"], lay["rps"], lay["wps"]
    DW, DPT, RS, RPT = lay["dw"], lay["dpt"], lay["rs"], lay["rpt"]
    TPR, TPG = lay["tpr"], lay["tpg"]
    STAGE_PS = lay["stage_ps"]
    PS_SHAPE = (ROWS, TILE_TOKENS, NGV) if STAGE_PS else (1, 1, 1)
    KB, VB = key_bits, value_bits
    KCPW = 32 // key_bits
    KMASK, VMASK = (1 << key_bits) - 1, (1 << value_bits) - 1
    GV = value_group_size
    NT = NUM_THREADS
    NACC = DPT * RPT
    ROTATE, SCALE_TOKENS, NORM_PER_HEAD = bool(rotate_keys), bool(scale_tokens), bool(norm_per_head)
    HS = _hadamard_scale(D)
    load_q = _loader(q_dtype)
    code_f32 = _code_to_f32

    @cuda.jit(device=True)
    def write_partials(ws_max, ws_sum, ws_acc, acc, m_s, l_s, b, kvh, split, tid, d0, r0):
        for jd in range(DPT):
            d = d0 + DW * jd
            for k in range(RPT):
                r = r0 + RS * k
                if r < ROWS:
                    ws_acc[b, kvh * G + r // LQ, r % LQ, split, d] = acc[jd * RPT + k]
        if tid < ROWS:
            ws_max[b, kvh * G + tid // LQ, tid % LQ, split] = m_s[tid]
            ws_sum[b, kvh * G + tid // LQ, tid % LQ, split] = l_s[tid]

    def split_kernel(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, ws_max,
                     ws_sum, ws_acc, scale, quantized_len, residual_len, num_splits, res_blocks,
                     out, lse, counter, fuse):
        tid = cuda.threadIdx.x
        lane = tid % TILE_TOKENS
        slot = tid // TILE_TOKENS
        b, kvh, split, t_begin, t_end = split_block(k_codes.shape[1], quantized_len, num_splits,
                                                    TPG, 0)
        nh = kvh if NORM_PER_HEAD else 0
        neg_inf = np.float32(-math.inf)
        seq_len = quantized_len + residual_len

        # per-thread PV ownership: channels d0 + DW * j, rows r0 + RS * k
        d0 = tid % DW
        r0 = tid // DW
        acc = cuda.local.array(NACC, np.float32)
        for j in range(NACC):
            acc[j] = np.float32(0.0)

        m_s = cuda.shared.array(ROWS, np.float32)  # running max per row
        l_s = cuda.shared.array(ROWS, np.float32)  # running sum of exps per row
        if tid < ROWS:  # each thread later reads back only its own entries, or after barriers
            m_s[tid] = neg_inf
            l_s[tid] = np.float32(0.0)
        if t_begin >= t_end:  # block-uniform: no barrier is skipped by part of the block
            write_partials(ws_max, ws_sum, ws_acc, acc, m_s, l_s, b, kvh, split, tid, d0, r0)
            return

        qs = cuda.shared.array((ROWS, D), np.float32)  # rotated, scaled queries
        qp = cuda.shared.array((ROWS, D), np.float32)  # ... times the key group's scales
        kmin = cuda.shared.array(ROWS, np.float32)  # sum_c q_c * min_c of the key group
        red = cuda.shared.array(NT, np.float32)
        part = cuda.shared.array((WSPLIT, ROWS, TILE_TOKENS), np.float32)
        sc = cuda.shared.array((ROWS, TILE_TOKENS), np.float32)  # scores, then p
        vws = cuda.shared.array((TILE_TOKENS, VW), np.uint32)
        vsc = cuda.shared.array((TILE_TOKENS, NGV), np.float32)
        vmn = cuda.shared.array((TILE_TOKENS, NGV), np.float32)
        ps = cuda.shared.array(PS_SHAPE, np.float32)
        pmin = cuda.shared.array((ROWS, NGV), np.float32)
        alpha_s = cuda.shared.array(ROWS, np.float32)

        for idx in range(tid, ROWS * D, NT):
            r = idx // D
            c = idx % D
            qs[r, c] = load_q(q[b, kvh * G + r // LQ, r % LQ, c])
        if ROTATE:
            fwht_shared(qs, ROWS, D, tid, NT)
            qfac = scale * np.float32(HS)
        else:
            cuda.syncthreads()
            qfac = scale
        for idx in range(tid, ROWS * D, NT):
            qs[idx // D, idx % D] *= qfac
        cuda.syncthreads()

        for tile in range(t_begin, t_end):
            tok0 = tile * TILE_TOKENS
            if tile % TPG == 0:  # first tile of a key group: fold its (scale, min) into q
                grp = tile // TPG
                for idx in range(tid, ROWS * D, NT):
                    r = idx // D
                    c = idx % D
                    qp[r, c] = qs[r, c] * np.float32(k_params[b, kvh, grp, c, 0])
                r = tid // TPR
                s = np.float32(0.0)
                if r < ROWS:
                    for c in range(tid % TPR, D, TPR):
                        s += qs[r, c] * np.float32(k_params[b, kvh, grp, c, 1])
                red[tid] = s
                cuda.syncthreads()  # qp and red complete
                if tid < ROWS:
                    s = red[tid * TPR]
                    for j in range(1, TPR):
                        s += red[tid * TPR + j]
                    kmin[tid] = s  # read after the QK barrier below

            # stage the tile's value words (one flat run, docs/format.md) and params (coalesced)
            for idx in range(tid, TILE_TOKENS * VW, NT):
                vws[idx // VW, idx % VW] = v_codes[b, kvh, tok0 + idx // VW, idx % VW]
            for idx in range(tid, TILE_TOKENS * NGV, NT):
                t = idx // NGV
                g = idx % NGV
                pr, pg, pp = value_param_location(t, g, 0, NGV)  # the tiled order; the min
                vsc[t, g] = np.float32(v_params[b, kvh, tok0 + pr, pg, pp])  # 8 rows on
                vmn[t, g] = np.float32(v_params[b, kvh, tok0 + pr + 8, pg, pp])

            # QK partial dots: lane = token, slot = (word slice, row group)
            ws = slot % WSPLIT
            rg = slot // WSPLIT
            if rg < RG:
                dots = cuda.local.array(RPS, np.float32)
                for k in range(RPS):
                    dots[k] = np.float32(0.0)
                for j in range(WPS):
                    w = ws + WSPLIT * j
                    word = k_codes[b, kvh, tile, w, lane]
                    for e in range(KCPW):
                        cf = code_f32((word >> np.uint32(KB * e)) & np.uint32(KMASK))
                        c = w * KCPW + e
                        for k in range(RPS):
                            r = rg + RG * k
                            if r < ROWS:
                                dots[k] += qp[r, c] * cf
                for k in range(RPS):
                    r = rg + RG * k
                    if r < ROWS:
                        part[ws, r, lane] = dots[k]
            cuda.syncthreads()

            # scores: sum the slices, add the min fold, times n_t; causal mask
            for idx in range(tid, ROWS * TILE_TOKENS, NT):
                r = idx // TILE_TOKENS
                l = idx % TILE_TOKENS
                t = tok0 + l
                s = neg_inf
                if t <= seq_len - LQ + r % LQ:
                    s = kmin[r]
                    for u in range(WSPLIT):
                        s += part[u, r, l]
                    if SCALE_TOKENS:
                        s *= norms[b, nh, t]
                sc[r, l] = s
            cuda.syncthreads()

            # online softmax: new running max and the rescale factor of the old sums
            if tid < ROWS:
                mt = neg_inf
                for l in range(TILE_TOKENS):
                    mt = max(mt, sc[tid, l])
                m_old = m_s[tid]
                m_new = max(m_old, mt)
                alpha = np.float32(1.0)
                if m_new != neg_inf:
                    alpha = math.exp(m_old - m_new)  # exp(-inf) = 0 when m_old = -inf
                m_s[tid] = m_new
                alpha_s[tid] = alpha
            cuda.syncthreads()
            for idx in range(tid, ROWS * TILE_TOKENS, NT):
                r = idx // TILE_TOKENS
                l = idx % TILE_TOKENS
                s = sc[r, l]
                p = np.float32(0.0)
                if s != neg_inf:
                    p = math.exp(s - m_s[r])
                sc[r, l] = p
            cuda.syncthreads()

            # fold the value dequantization into p
            if STAGE_PS:
                for idx in range(tid, ROWS * TILE_TOKENS * NGV, NT):
                    r = idx // (TILE_TOKENS * NGV)
                    l = (idx // NGV) % TILE_TOKENS
                    g = idx % NGV
                    ps[r, l, g] = sc[r, l] * vsc[l, g]
            for idx in range(tid, ROWS * NGV, NT):
                r = idx // NGV
                g = idx % NGV
                s = np.float32(0.0)
                for l in range(TILE_TOKENS):
                    s += sc[r, l] * vmn[l, g]
                pmin[r, g] = s
            if tid < ROWS:
                s = np.float32(0.0)
                for l in range(TILE_TOKENS):
                    s += sc[tid, l]
                l_s[tid] = l_s[tid] * alpha_s[tid] + s
            cuda.syncthreads()

            # PV: thread owns (channel, rows); each code unpacked once, one FMA per row
            for jd in range(DPT):
                d = d0 + DW * jd
                g = d // GV
                for k in range(RPT):
                    r = r0 + RS * k
                    if r < ROWS:
                        acc[jd * RPT + k] *= alpha_s[r]
                for l in range(TILE_TOKENS):
                    f, sh = value_code_location(l, d, D, VB)  # the tiled value layout
                    cf = code_f32((vws[f // VW, f % VW] >> np.uint32(sh)) & np.uint32(VMASK))
                    for k in range(RPT):
                        r = r0 + RS * k
                        if r < ROWS:
                            if STAGE_PS:
                                f = ps[r, l, g]
                            else:
                                f = sc[r, l] * vsc[l, g]
                            acc[jd * RPT + k] += f * cf
                for k in range(RPT):
                    r = r0 + RS * k
                    if r < ROWS:
                        acc[jd * RPT + k] += pmin[r, g]
            cuda.syncthreads()  # the next tile overwrites the staged values, part, sc, ps

        write_partials(ws_max, ws_sum, ws_acc, acc, m_s, l_s, b, kvh, split, tid, d0, r0)

    return split_kernel, sig


# --- kernel 2: merge ------------------------------------------------------------------------


def _merge_signature(q_dtype, res_dtype, out_dtype):
    q, r, o = _SIG_TYPE[q_dtype], _SIG_TYPE[res_dtype], _SIG_TYPE[out_dtype]
    return (f"void({q}[:, :, :, ::1], {r}[:, :, :, ::1], {r}[:, :, :, ::1], "
            "float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, :, ::1], "
            f"{o}[:, :, :, ::1], float32[:, :, ::1], float32, int32, int32, int32, int32)")


def _merge_geometry(head_dim, residual_length, res_dtype):
    """Compile-time split of the residual tokens over the merge kernel's lanes.

    A residual row of ``head_dim`` elements is ``nck`` 16-byte chunks; ``lpr = min(nck, 32)``
    lanes share a row (``cpl`` chunks each), so one warp-wide 16-byte load covers ``tpw``
    tokens; a warp streams ``ni`` such token groups per round (at most ``MERGE_LANE_CHUNKS``
    chunks per lane in flight), ``rounds`` rounds cover ``residual_length``.
    """
    es = 2 if res_dtype in ("float16", "bfloat16") else 4
    vpl = 16 // es
    nck = head_dim // vpl
    lpr = min(nck, WARP_SIZE)
    cpl = nck // lpr
    tpw = WARP_SIZE // lpr
    ni = max(1, min(MERGE_LANE_CHUNKS // cpl, -(-residual_length // (NUM_WARPS * tpw))))
    rounds = -(-residual_length // (NUM_WARPS * tpw * ni))
    return dict(es=es, vpl=vpl, nck=nck, lpr=lpr, cpl=cpl, tpw=tpw, ni=ni, rounds=rounds)


def _build_merge(head_dim, residual_length, q_dtype, res_dtype, rotate_values,
                 out_dtype="float32"):
    """Python function and signature of kernel 2 for one compile-time configuration.

    ``out_dtype`` is float32 or q's dtype: the kernel rounds the float32 result once on the
    store (round to nearest even, as torch's ``.to``), so a caller needs no cast kernel.

    ``res_slot`` (a kernel argument) = 1: the split kernel's residual blocks have computed the
    residual tokens' partial (max, sum, unrotated value sum) at workspace slot ``num_splits``;
    the merge weighs it like a split and adds its value sum after the inverse rotation, and does
    not read the residual arrays. 0: the merge scores the residual itself, as follows.

    One block (4 warps) per (batch, query head, row). Latency is what matters here (at batch 1
    the whole decode step is a few microseconds of dependent round trips), so every global load
    that does not depend on another is issued first: the query row, the split maxima and sums,
    and the residual keys and values of the first round, as 16-byte read-only loads
    (``_merge_geometry``: lane ``l`` reads chunk ``l % lpr`` of token ``l // lpr`` of each token
    group, so a warp's load is 512 contiguous bytes). Residual scores are partial dot products
    reduced over the ``lpr`` lanes of a row by ``shfl_xor``; the residual value sum is
    accumulated in the same registers and reduced over the tokens of a warp by shuffles, then
    over the warps through shared memory. The quantized value sum takes one 16-byte row chunk
    (4 channels) per lane and the splits round-robin over the warps, 8 loads in flight per lane.
    """
    D, R = head_dim, residual_length
    NT, NW = NUM_THREADS, NUM_WARPS
    ROTATE = bool(rotate_values)
    HS = _hadamard_scale(D)
    load_q = _loader(q_dtype)
    geo = _merge_geometry(D, R, res_dtype)
    ES, VPL, LPR, CPL, TPW, NI, ROUNDS = (geo[k] for k in ("es", "vpl", "lpr", "cpl", "tpw", "ni",
                                                           "rounds"))
    NL = NI * CPL  # 16-byte chunks per lane and round
    NLW = 4 * NL  # their uint32 words
    NVAL = CPL * VPL  # residual channels per lane
    TR = NI * TPW  # tokens per warp and round
    ONE_ROUND = ROUNDS == 1  # the values of the only round stay in registers from the start
    QC = D // 4  # 16-byte chunks of a float32 row of split_acc
    NQC = -(-QC // WARP_SIZE)
    NQA = 4 * NQC  # (array sizes must be closure constants)
    UNROLL = 8  # split_acc loads in flight per lane
    CQ = D // WARP_SIZE  # output channels per lane of warp 0
    fwht_row = fwht_warp(D)
    ROW_B = D * ES  # bytes per residual row
    ZERO_F = np.float32(0.0)
    store = _storer(out_dtype)
    element = _res.chunk_element(res_dtype)

    @cuda.jit(device=True)
    def load_round(base, t0, lane, nvalid, regs):
        """The chunks of this lane for tokens t0 + i * TPW + lane // LPR (i < NI) of one
        (batch, kv head) residual array at global address ``base``; zeros past ``nvalid``."""
        for i in range(NI):
            t = t0 + i * TPW + lane // LPR
            for c in range(CPL):
                k = c * LPR + lane % LPR
                o = 4 * (i * CPL + c)
                if t < nvalid:
                    w0, w1, w2, w3 = ldg4(base + np.int64(t * ROW_B + 16 * k))
                else:
                    w0 = w1 = w2 = w3 = np.uint32(0)
                regs[o] = w0
                regs[o + 1] = w1
                regs[o + 2] = w2
                regs[o + 3] = w3

    def merge_kernel(q, k_res, v_res, ws_max, ws_sum, ws_acc, out, lse, scale, quantized_len,
                     residual_len, num_splits, res_slot):
        tid = cuda.threadIdx.x
        lane = tid % WARP_SIZE
        warp = tid // WARP_SIZE
        nq = q.shape[1]
        lq = q.shape[2]
        g_size = nq // k_res.shape[1]
        row = cuda.blockIdx.x
        b = row // (nq * lq)
        hq = (row // lq) % nq
        i = row % lq
        kvh = hq // g_size
        neg_inf = np.float32(-math.inf)
        last = quantized_len + residual_len - lq + i  # last visible position
        # residual tokens this row scores (causal rows of a multi-token query see fewer): none
        # when the split kernel's residual blocks have computed their partial (block-uniform)
        has_slot = res_slot != 0
        nres = 0 if has_slot else min(residual_len, last - quantized_len + 1)

        qv = cuda.shared.array(D, np.float32)
        sr = cuda.shared.array(R, np.float32)  # residual scores, then p
        part = cuda.shared.array((NW, D), np.float32)  # per-warp residual value sums
        qpart = cuda.shared.array((NW, D), np.float32)  # per-warp quantized value sums
        redm = cuda.shared.array(NW, np.float32)  # warp maxima (block max)
        reds = cuda.shared.array(NW, np.float32)  # warp sums (block sum)
        wsp = cuda.shared.array(MAX_SPLITS, np.float32)  # split weights exp(m_split - M)
        wres = cuda.shared.array(1, np.float32)  # the residual partial's weight

        # --- independent loads first: query, split statistics, first round of K and V ------
        if nres > 0:
            for c in range(tid, D, NT):
                qv[c] = load_q(q[b, hq, i, c]) * scale
        mu0 = neg_inf
        mu1 = neg_inf
        su0 = ZERO_F
        su1 = ZERO_F
        if tid < num_splits:
            mu0 = ws_max[b, hq, i, tid]
            su0 = ws_sum[b, hq, i, tid]
        if tid + NT < num_splits:
            mu1 = ws_max[b, hq, i, tid + NT]
            su1 = ws_sum[b, hq, i, tid + NT]
        mur = neg_inf
        sur = ZERO_F
        rv = cuda.local.array(CQ, np.float32)  # warp 0: the residual partial's value sum
        if has_slot:
            if tid == NT - 1:
                mur = ws_max[b, hq, i, num_splits]
                sur = ws_sum[b, hq, i, num_splits]
            if warp == 0:
                for k in range(CQ):
                    rv[k] = ws_acc[b, hq, i, num_splits, lane * CQ + k]
        kbase = global_address(k_res, (b, kvh, 0, 0))
        vbase = global_address(v_res, (b, kvh, 0, 0))
        kr = cuda.local.array(NLW, np.uint32)
        vr = cuda.local.array(NLW, np.uint32)
        qr = cuda.local.array(NVAL, np.float32)
        acc = cuda.local.array(NVAL, np.float32)
        xo = cuda.local.array(CQ, np.float32)
        for j in range(NVAL):
            acc[j] = ZERO_F
        if ONE_ROUND and nres > 0:
            load_round(kbase, warp * TR, lane, nres, kr)
            load_round(vbase, warp * TR, lane, nres, vr)

        cuda.syncthreads()  # qv
        for c in range(CPL):
            k = c * LPR + lane % LPR
            for j in range(VPL):
                qr[c * VPL + j] = qv[k * VPL + j]

        # --- residual scores: partial dot products, reduced over the LPR lanes of a row -------
        m = max(max(mu0, mu1), mur)
        for t0 in range(warp * TR, nres, NW * TR):
            if not ONE_ROUND:
                load_round(kbase, t0, lane, nres, kr)
            for ii in range(NI):
                s = ZERO_F
                for c in range(CPL):
                    o = 4 * (ii * CPL + c)
                    for j in range(VPL):
                        s += qr[c * VPL + j] * element(kr, o, j)
                off = LPR // 2
                while off > 0:
                    s += cuda.shfl_xor_sync(0xFFFFFFFF, s, off)
                    off //= 2
                t = t0 + ii * TPW + lane // LPR
                if t < nres:
                    m = max(m, s)
                    if lane % LPR == 0:
                        sr[t] = s
        m = _block_max(redm, m, tid)
        if m == neg_inf:  # cannot happen (token 0 is always visible); keeps exp() finite
            m = np.float32(0.0)

        # --- softmax weights: splits and residual tokens ---------------------------------------
        # an empty split (max -inf) weighs 0; 0 * its sum and 0 * its value sum still carry a
        # NaN (a split whose scores were all NaN reports max -inf or NaN, sum NaN)
        total = ZERO_F
        if tid < num_splits:
            w = ZERO_F
            if mu0 != neg_inf:
                w = math.exp(mu0 - m)
            wsp[tid] = w
            total += w * su0
        if tid + NT < num_splits:
            w = ZERO_F
            if mu1 != neg_inf:
                w = math.exp(mu1 - m)
            wsp[tid + NT] = w
            total += w * su1
        if has_slot and tid == NT - 1:
            w = ZERO_F
            if mur != neg_inf:
                w = math.exp(mur - m)
            wres[0] = w
            total += w * sur
        for t in range(tid, nres, NT):
            p = math.exp(sr[t] - m)
            sr[t] = p
            total += p
        total = _block_sum(reds, total, tid)  # its barrier publishes wsp and sr

        # --- residual value sum: this lane's channels over its tokens, then over the warp -----
        for t0 in range(warp * TR, nres, NW * TR):
            if not ONE_ROUND:
                load_round(vbase, t0, lane, nres, vr)
            for ii in range(NI):
                t = t0 + ii * TPW + lane // LPR
                p = ZERO_F
                if t < nres:
                    p = sr[t]
                for c in range(CPL):
                    o = 4 * (ii * CPL + c)
                    for j in range(VPL):
                        acc[c * VPL + j] += p * element(vr, o, j)
        for j in range(NVAL):
            a = acc[j]
            off = LPR
            while off < WARP_SIZE:
                a += cuda.shfl_xor_sync(0xFFFFFFFF, a, off)
                off *= 2
            acc[j] = a
        if not has_slot and lane < LPR:
            for c in range(CPL):
                k = c * LPR + lane
                for j in range(VPL):
                    part[warp, k * VPL + j] = acc[c * VPL + j]

        # --- quantized value sum: 4 channels per lane, splits round-robin over the warps ------
        qa = cuda.local.array(NQA, np.float32)
        for j in range(NQA):
            qa[j] = ZERO_F
        abase = global_address(ws_acc, (b, hq, i, 0, 0))
        for n in range(NQC):
            k = lane + WARP_SIZE * n
            if QC % WARP_SIZE == 0 or k < QC:
                u0 = warp
                while u0 < num_splits:
                    # up to UNROLL loads in flight, then their FMAs
                    for uu in range(UNROLL):
                        u = u0 + NW * uu
                        if u < num_splits:
                            w0, w1, w2, w3 = ldg4(abase + np.int64((u * D + 4 * k) * 4))
                            wt = wsp[u]
                            qa[4 * n] += wt * uint_as_float(w0)
                            qa[4 * n + 1] += wt * uint_as_float(w1)
                            qa[4 * n + 2] += wt * uint_as_float(w2)
                            qa[4 * n + 3] += wt * uint_as_float(w3)
                    u0 += NW * UNROLL
                for j in range(4):
                    qpart[warp, 4 * k + j] = qa[4 * n + j]
        cuda.syncthreads()
        # warp 0 finishes: sums the warps' parts of its CQ channels per lane, un-rotates the
        # quantized sum in registers (fwht_warp: no barrier) and writes the row
        if warp == 0:
            for k in range(CQ):
                c = lane * CQ + k
                a = ZERO_F
                for w in range(NW):
                    a += qpart[w, c]
                xo[k] = a
            if ROTATE:
                fwht_row(xo, lane)
            for k in range(CQ):
                c = lane * CQ + k
                o = xo[k]
                if ROTATE:
                    o *= np.float32(HS)
                r = ZERO_F
                if has_slot:
                    r = wres[0] * rv[k]
                else:
                    for w in range(NW):
                        r += part[w, c]
                out[b, hq, i, c] = store((o + r) / total)
            if lane == 0:
                lse[b, hq, i] = m + math.log(total)

    return merge_kernel, _merge_signature(q_dtype, res_dtype, out_dtype)


# --- cached compiled kernels ----------------------------------------------------------------


#: Register cap of the v3 split kernel: 128 gives 4 blocks (16 warps) per SM without spills
#: (ptxas alone picks ~137, i.e. 3 blocks). None: ptxas decides. Environment:
#: OSCAR_V3_MAX_REGISTERS (0 = no cap).
V3_MAX_REGISTERS = int(__import__("os").environ.get("OSCAR_V3_MAX_REGISTERS", "128")) or None


def _uses_v3(key):
    kb, vb, _, gv, d, g, lq, pdt = key[:8]
    return SPLIT_VERSION == 3 and _split_v3.unsupported(kb, vb, gv, d, g * lq, pdt) is None


def _split_kernel(*key):
    """The compiled split kernel of ``key`` under the current module switches (SPLIT_VERSION,
    V3_MAX_REGISTERS: a benchmark may flip them between calls)."""
    return _compiled_split(key, SPLIT_VERSION, V3_MAX_REGISTERS)


@functools.lru_cache(maxsize=None)
def _compiled_split(key, version, max_registers):
    fn, sig = _build_split(*key)  # reads the same switches
    name = f"split_v{3 if _uses_v3(key) else 1}"
    if _uses_v3(key) and max_registers and not SIMULATOR:
        return jit(fn, sig, name=name, key=key, max_registers=max_registers)
    return jit(fn, sig, name=name, key=key)


def split_blocks_per_sm(config, head_dim, gqa, q_len, q_dtype, res_dtype):
    """Resident blocks per SM of the split kernel for this configuration (from its compiled
    register and shared-memory use; compiles it if needed), for :func:`choose_num_splits`."""
    key = _split_key(config, head_dim, gqa, q_len, q_dtype, res_dtype)
    return _blocks_per_sm(key, SPLIT_VERSION, V3_MAX_REGISTERS)


@functools.lru_cache(maxsize=None)
def _blocks_per_sm(key, version, max_registers):
    if SIMULATOR or not _uses_v3(key):
        return TARGET_BLOCKS_PER_SM
    kern = _split_kernel(*key)
    dev = cuda.get_current_device()
    # the device's per-SM limits (Hopper values if the driver does not report one)
    sm_regs = int(getattr(dev, "MAX_REGISTERS_PER_MULTIPROCESSOR", 65536))
    sm_smem = int(getattr(dev, "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR", 228 * 1024))
    sm_threads = int(getattr(dev, "MAX_THREADS_PER_MULTIPROCESSOR", 2048))
    regs = max(1, int(kern.get_regs_per_thread()))
    smem = int(kern.get_shared_mem_per_block()) + 1024  # + the per-block reservation
    by_regs = sm_regs // (((regs * 32 + 255) // 256) * 256 * NUM_WARPS)  # per-warp granules
    return max(1, min(by_regs, sm_smem // smem, sm_threads // NUM_THREADS))


@functools.lru_cache(maxsize=None)
def _merge_kernel(*key):
    fn, sig = _build_merge(*key)
    return jit(fn, sig, name="merge", key=key)


def _split_key(config, head_dim, gqa, q_len, q_dtype, res_dtype, out_dtype=None, fused=False):
    return (config.key_bits, config.value_bits, config.key_group_size, config.value_group_size,
            head_dim, gqa, q_len, config.param_dtype, q_dtype, config.rotate_keys,
            config.scale_tokens, config.norm_scope == "head", res_dtype, config.residual_length,
            q_dtype if out_dtype is None else out_dtype, config.rotate_values, bool(fused))


@functools.lru_cache(maxsize=None)
def _residual_in_split(split_key, version):
    """:func:`residual_in_split` of a split key, cached (``version``: SPLIT_VERSION)."""
    return residual_in_split(*split_key)


@functools.lru_cache(maxsize=None)
def _num_sms():
    if SIMULATOR:
        return 132
    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def residual_block_rows(split_key, batch, num_kv_heads, residual_len, num_splits):
    """Block rows of residual blocks in a launch of the split kernel of ``split_key`` (0: the
    merge kernel scores the residual), by RESIDUAL_BLOCKS."""
    if RESIDUAL_BLOCKS not in ("auto", "on", "off"):
        raise ValueError("RESIDUAL_BLOCKS (environment OSCAR_RESIDUAL_BLOCKS): expected 'auto', "
                         f"'on' or 'off', got {RESIDUAL_BLOCKS!r}")
    if residual_len <= 0 or RESIDUAL_BLOCKS == "off":
        return 0
    if not _residual_in_split(split_key, SPLIT_VERSION):
        return 0
    rows = _res.blocks_per_head(split_key[5], split_key[6])
    if RESIDUAL_BLOCKS == "auto":
        slots = _blocks_per_sm(split_key, SPLIT_VERSION, V3_MAX_REGISTERS) * _num_sms()
        if batch * num_kv_heads * (num_splits + rows) > slots:
            return 0
    return rows


def residual_reserve(split_key, batch, num_kv_heads, residual_len, num_sms, blocks_per_sm):
    """Slots :func:`choose_num_splits` should leave for residual blocks: all of them when they
    are at most ``RESIDUAL_RESERVE`` of one wave (a few splits fewer, each a little longer,
    costs less than the merge kernel's residual pass: batch 1 at 32K tokens), else 0 (then
    they run only where the splits leave room, :func:`residual_block_rows`)."""
    if residual_len <= 0 or RESIDUAL_BLOCKS == "off":
        return 0
    if not _residual_in_split(split_key, SPLIT_VERSION):
        return 0
    n = batch * num_kv_heads * _res.blocks_per_head(split_key[5], split_key[6])
    return n if n <= RESIDUAL_RESERVE * blocks_per_sm * num_sms else 0


def merge_in_split(split_key, res_rows, quantized_len, residual_len, num_splits):
    """Whether the split kernel's last blocks merge (``attention_fused``; no merge launch):
    FUSED_MERGE, the v3 kernel, the merge kernel need not score the residual (``res_rows``
    block rows of residual blocks from :func:`residual_block_rows` or no residual tokens), at
    most FUSED_MAX_ARRIVALS blocks feed each merge, and at most FUSED_MAX_TILES_PER_SPLIT
    tiles per split."""
    tiles = -(-int(quantized_len) // TILE_TOKENS)
    return bool(FUSED_MERGE and _uses_v3(split_key)
                and (res_rows > 0 or int(residual_len) == 0)
                and int(num_splits) + res_rows <= FUSED_MAX_ARRIVALS
                and tiles <= FUSED_MAX_TILES_PER_SPLIT * int(num_splits))


def _merge_key(config, head_dim, q_dtype, res_dtype, out_dtype):
    return (head_dim, config.residual_length, q_dtype, res_dtype, config.rotate_values,
            out_dtype)


def compile_signatures():
    """Yield ``(name, pyfunc, signature)`` for representative configurations (PTX compile test).

    Split keys: (key_bits, value_bits, key_group_size, value_group_size, head_dim, G, q_len,
    param_dtype, q_dtype, rotate_keys, scale_tokens, norm_per_head, res_dtype,
    residual_length[, out_dtype, rotate_values, fused]); merge keys: (head_dim, residual_length,
    q_dtype, res_dtype, rotate_values,
    out_dtype).
    """
    splits = [  # Llama-3.1-8B first (v3 with its residual blocks)
        (2, 2, 32, 32, 128, 4, 1, "float16", "bfloat16", True, True, False, "bfloat16", 128),
        (4, 4, 64, 32, 64, 1, 1, "float32", "float32", True, True, True, "float32", 64),
        (2, 4, 128, 64, 256, 8, 2, "float16", "float16", True, True, False, "float16", 256),
        (8, 8, 32, 8, 32, 2, 3, "float16", "float16", False, False, False, "float32", 32),
        (8, 8, 32, 4, 256, 4, 1, "float16", "float16", True, True, False, "float16", 32),
        (2, 2, 32, 16, 128, 8, 4, "float16", "float32", True, True, False, "bfloat16", 128),
        (2, 2, 32, 32, 128, 4, 2, "float16", "float16", True, True, False, "float32", 64),
        (2, 2, 32, 32, 128, 4, 1, "float16", "bfloat16", True, True, False, "bfloat16", 128,
         "bfloat16", True, True),  # with the fused merge, out in q's dtype
        (2, 2, 32, 16, 64, 2, 3, "float16", "float32", True, True, True, "float16", 32,
         "float32", False, True),
    ]
    merges = [
        (128, 128, "bfloat16", "bfloat16", True, "bfloat16"),  # Llama-3.1-8B, out in q's dtype
        (128, 128, "bfloat16", "bfloat16", True, "float32"),
        (64, 32, "float32", "float32", True, "float32"),
        (256, 256, "float16", "float16", False, "float16"),
        (32, 64, "float16", "float32", True, "float32"),
    ]
    global SPLIT_VERSION
    saved = SPLIT_VERSION
    try:
        for version in (1, 2, 3):  # every split kernel (each falls back where unsupported)
            SPLIT_VERSION = version
            for key in splits:
                fn, sig = _build_split(*key)
                yield f"attention.split_v{version}{key}", fn, sig
    finally:
        SPLIT_VERSION = saved
    for key in merges:
        fn, sig = _build_merge(*key)
        yield f"attention.merge{key}", fn, sig


# --- host side ------------------------------------------------------------------------------


def choose_num_splits(batch, num_kv_heads, quantized_len, num_sms=132, blocks_per_sm=None,
                      reserve_blocks=0):
    """Splits of the token axis per (batch, kv head): enough blocks to fill the GPU.

    About ``blocks_per_sm * num_sms`` blocks in all (default ``TARGET_BLOCKS_PER_SM``; the v3
    kernel passes its resident blocks per SM from :func:`split_blocks_per_sm`, so that one wave
    covers the work, less ``reserve_blocks`` slots for residual blocks, from
    :func:`residual_reserve`), each streaming at least ``MIN_TILES_PER_SPLIT`` tiles, at most
    ``MAX_SPLITS`` splits; 1 for an empty cache.
    """
    tiles = int(quantized_len) // TILE_TOKENS
    if tiles <= 0:
        return 1
    per_sm = TARGET_BLOCKS_PER_SM if blocks_per_sm is None else int(blocks_per_sm)
    heads = max(1, int(batch) * int(num_kv_heads))
    if blocks_per_sm is None:
        want = -(-per_sm * int(num_sms) // heads)
    else:  # whole waves: never a second, mostly idle wave
        want = max(1, (per_sm * int(num_sms) - int(reserve_blocks)) // heads)
    cap = -(-tiles // MIN_TILES_PER_SPLIT)
    return max(1, min(want, cap, MAX_SPLITS))


def plan_splits(config, batch, num_kv_heads, head_dim, gqa, q_len, q_dtype, res_dtype,
                quantized_len, residual_len, num_sms):
    """num_splits for one decode call: :func:`choose_num_splits` with the split kernel's
    resident blocks per SM and the slots its residual blocks get (:func:`residual_reserve`)."""
    per_sm = split_blocks_per_sm(config, head_dim, gqa, q_len, q_dtype, res_dtype)
    skey = _split_key(config, head_dim, gqa, q_len, q_dtype, res_dtype)
    reserve = residual_reserve(skey, batch, num_kv_heads, residual_len, num_sms, per_sm)
    return choose_num_splits(batch, num_kv_heads, quantized_len, num_sms=num_sms,
                             blocks_per_sm=per_sm, reserve_blocks=reserve)


def workspace_shapes(batch, num_q_heads, q_len, head_dim, num_splits):
    """Shapes of the float32 workspace arrays of :func:`decode_attention`, by name.

    ``split_max``/``split_sum`` ``[batch, num_q_heads, q_len, num_splits + 1]``: each split's
    running max and sum of exps; ``split_acc`` ``[..., num_splits + 1, head_dim]``: its
    unnormalized rotated value sum. Slot ``num_splits`` holds the residual tokens' partial
    (unrotated value sum) when the split kernel computes it (:func:`residual_in_split`).
    ``split_count`` (int32, ``WORKSPACE_DTYPES``) ``[batch, num_q_heads]``: the fused merge's
    arrival counters (entry ``[b, kv_head]``); zero before the first call, and every call
    leaves them zero.
    """
    base = (int(batch), int(num_q_heads), int(q_len), int(num_splits) + 1)
    return {"split_max": base, "split_sum": base, "split_acc": base + (int(head_dim),),
            "split_count": (int(batch), int(num_q_heads))}


#: dtype of each workspace array (:func:`workspace_shapes`); ``split_count`` must start at zero.
WORKSPACE_DTYPES = {"split_max": np.float32, "split_sum": np.float32, "split_acc": np.float32,
                    "split_count": np.int32}


def _dtype_name(x):
    """dtype name of a Numba device array, NumPy array or torch tensor, without building a
    ``__cuda_array_interface__`` (torch rebuilds it on every access)."""
    dt = x.dtype
    if isinstance(dt, np.dtype):
        return dt.name
    name = str(dt)
    return name[len("torch."):] if name.startswith("torch.") else np.dtype(dt).name


def _c_contiguous(x):
    """C-contiguity of a torch tensor, Numba device array or (simulator) NumPy array."""
    for attr in ("is_contiguous", "is_c_contiguous"):
        f = getattr(x, attr, None)
        if callable(f):
            return bool(f())
    flags = getattr(x, "flags", None)
    return True if flags is None else bool(flags["C_CONTIGUOUS"])


def _expect(name, x, shape, dtype):
    on_device = getattr(x, "is_cuda", None)
    if on_device is None:
        on_device = SIMULATOR or cuda.is_cuda_array(x)
    if not on_device:
        raise TypeError(f"{name}: expected a CUDA device array, got {type(x).__name__}")
    got = tuple(int(s) for s in x.shape)
    if got != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {got}")
    want = np.dtype(dtype).name
    if _dtype_name(x) != want:
        raise TypeError(f"{name}: expected dtype {want}, got {_dtype_name(x)}")
    if not _c_contiguous(x):  # the kernels address tiles with fixed strides
        raise ValueError(f"{name}: expected a C-contiguous array, got strides "
                         f"{tuple(getattr(x, 'strides', ()))}")


def decode_attention(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse,
                     workspace, config, scale, quantized_len, residual_len, q_dtype, res_dtype,
                     num_splits, stream=0, check=True):
    """Decode attention over packed + residual tokens; writes ``out`` and ``lse``. Two launches,
    or one where the split kernel merges (``FUSED_MERGE``; short steps).

    Args:
        q: ``[batch, num_q_heads, q_len, head_dim]`` float16/float32, or int16 bfloat16 bits.
        k_codes: uint32 ``[batch, num_kv_heads, capacity / 32, head_dim * key_bits / 32, 32]``.
        k_params: ``[batch, num_kv_heads, capacity / key_group_size, head_dim, 2]``.
        v_codes: uint32 ``[batch, num_kv_heads, capacity, head_dim * value_bits / 32]``.
        v_params: ``[batch, num_kv_heads, capacity, head_dim / value_group_size, 2]`` (tiled
            by 32 tokens, docs/format.md section 2c).
        norms: float32 ``[batch, 1 or num_kv_heads, capacity]``; any ``[1, 1, 1]`` array when
            ``config.scale_tokens`` is False.
        k_res, v_res: ``[batch, num_kv_heads, residual_length, head_dim]`` in ``res_dtype``.
        out: ``[batch, num_q_heads, q_len, head_dim]``, float32 or q's dtype (bfloat16 as
            int16 bits): the merge rounds its float32 result once on the store; lse: float32
            ``[batch, num_q_heads, q_len]`` (natural log).
        workspace: dict of the arrays of :func:`workspace_shapes` (dtypes ``WORKSPACE_DTYPES``;
            ``split_count`` zero before the first call, left zero by every call).
        config: the cache's OScaRConfig. scale: logit scale.
        quantized_len: valid packed tokens (a multiple of key_group_size, <= capacity).
        residual_len: valid residual tokens, ``0 <= residual_len < residual_length``.
        q_dtype, res_dtype: ``"float16"``, ``"float32"`` or ``"bfloat16"``.
        num_splits: from :func:`choose_num_splits`, 1..MAX_SPLITS.
        stream: the CUDA stream to launch on.
        check: validate every argument first (tens of microseconds of Python); a caller that
            has validated the same buffers once may pass False.
    """
    if check:
        _check_arguments(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse,
                         workspace, config, quantized_len, residual_len, q_dtype, res_dtype,
                         num_splits)
    for kernel, grid, block, args, _names in decode_launches(
            q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse, workspace,
            config, scale, quantized_len, residual_len, q_dtype, res_dtype, num_splits):
        launch(kernel, grid, block, stream, *args)


def decode_launches(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse,
                    workspace, config, scale, quantized_len, residual_len, q_dtype, res_dtype,
                    num_splits):
    """What :func:`decode_attention` launches, in order: ``[(kernel, grid, block, args)]``.

    The one place that decides which compiled kernels run for a step (the split kernel, with or
    without residual blocks and the fused merge, then the merge kernel unless fused), their
    grids and their argument lists. ``decode_attention`` launches them through Numba's
    dispatcher; oscar's launch plans (oscar/_launch.py) pack the same argument lists once and
    launch them through the driver.
    """
    batch, nq, q_len, d = (int(s) for s in q.shape)
    nkv = int(k_codes.shape[1])
    out_dtype = "float32" if _dtype_name(out) == "float32" else q_dtype
    skey = _split_key(config, d, nq // nkv, q_len, q_dtype, res_dtype, out_dtype)
    rows, fuse = launch_shape(skey, batch, nkv, quantized_len, residual_len, num_splits)
    split = _split_kernel(*skey[:-1], fuse)
    scale32 = np.float32(scale)
    ql, rl, ns = np.int32(quantized_len), np.int32(residual_len), np.int32(num_splits)
    ws_max, ws_sum, ws_acc = workspace["split_max"], workspace["split_sum"], workspace["split_acc"]
    launches = [(split, (batch * nkv, rows + int(num_splits)), NUM_THREADS,
                 (q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, ws_max, ws_sum,
                  ws_acc, scale32, ql, rl, ns, np.int32(rows), out, lse, workspace["split_count"],
                  np.int32(1 if fuse else 0)), SPLIT_ARGS)]
    if not fuse:
        merge = _merge_kernel(*_merge_key(config, d, q_dtype, res_dtype, out_dtype))
        launches.append((merge, batch * nq * q_len, NUM_THREADS,
                         (q, k_res, v_res, ws_max, ws_sum, ws_acc, out, lse, scale32, ql, rl, ns,
                          np.int32(1 if rows else 0)), MERGE_ARGS))
    return launches


def decode_kernels(config, head_dim, gqa, q_len, q_dtype, res_dtype, out_dtype=None):
    """Compile (or load from the kernel cache) every kernel a decode loop of this query shape
    can launch: the split kernel with and without the fused merge (which one runs changes with
    the cache length and the residual tokens, :func:`launch_shape`) and the merge kernel.
    Returns them, for warm-up."""
    skey = _split_key(config, head_dim, gqa, q_len, q_dtype, res_dtype, out_dtype)
    kernels = [_split_kernel(*skey[:-1], False)]
    if FUSED_MERGE and _uses_v3(skey):
        kernels.append(_split_kernel(*skey[:-1], True))
    out = q_dtype if out_dtype is None else out_dtype
    kernels.append(_merge_kernel(*_merge_key(config, head_dim, q_dtype, res_dtype, out)))
    _blocks_per_sm(skey[:-1] + (False,), SPLIT_VERSION, V3_MAX_REGISTERS)
    return kernels


def launch_shape(split_key, batch, num_kv_heads, quantized_len, residual_len, num_splits):
    """``(residual_rows, fused)`` of a step: the block rows of residual blocks before the
    splits (0: the merge kernel scores the residual tokens, :func:`residual_block_rows`), and
    whether the split kernel's last blocks merge (no merge launch, :func:`merge_in_split`)."""
    rows = residual_block_rows(split_key, batch, num_kv_heads, int(residual_len), int(num_splits))
    return rows, merge_in_split(split_key, rows, quantized_len, residual_len, num_splits)


#: Parameter names of the split and merge kernels, in order (:func:`decode_launches`).
SPLIT_ARGS = ("q", "k_codes", "k_params", "v_codes", "v_params", "norms", "k_res", "v_res",
              "split_max", "split_sum", "split_acc", "scale", "quantized_len", "residual_len",
              "num_splits", "residual_rows", "out", "lse", "split_count", "fused")
MERGE_ARGS = ("q", "k_res", "v_res", "split_max", "split_sum", "split_acc", "out", "lse", "scale",
              "quantized_len", "residual_len", "num_splits", "residual_slot")


def _check_arguments(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse,
                     workspace, config, quantized_len, residual_len, q_dtype, res_dtype,
                     num_splits):
    """ValueError / TypeError naming the first argument that breaks the contract."""
    for name, val in (("q_dtype", q_dtype), ("res_dtype", res_dtype)):
        if val not in Q_DTYPES:
            raise ValueError(f"{name}: expected one of {tuple(Q_DTYPES)}, got {val!r}")
    if len(q.shape) != 4:
        raise ValueError(f"q: expected [batch, num_q_heads, q_len, head_dim], got {tuple(q.shape)}")
    batch, nq, q_len, d = (int(s) for s in q.shape)
    config.check_head_dim(d, "q.shape[3] (head_dim)")
    if len(k_codes.shape) != 5:
        raise ValueError(f"k_codes: expected a 5-D array, got shape {tuple(k_codes.shape)}")
    nkv = int(k_codes.shape[1])
    if nkv <= 0 or nq % nkv:
        raise ValueError(f"num_q_heads ({nq}) must be a multiple of num_kv_heads ({nkv})")
    cap = int(v_codes.shape[2]) if len(v_codes.shape) == 4 else -1
    if cap < 0 or cap % config.key_group_size:
        raise ValueError(f"v_codes: expected [batch, num_kv_heads, capacity, words] with capacity "
                         f"a multiple of {config.key_group_size}, got {tuple(v_codes.shape)}")
    r_len = config.residual_length
    quantized_len, residual_len, num_splits = int(quantized_len), int(residual_len), int(num_splits)
    if not 0 <= quantized_len <= cap or quantized_len % config.key_group_size:
        raise ValueError(f"quantized_len: expected a multiple of {config.key_group_size} in "
                         f"[0, {cap}], got {quantized_len}")
    if not 0 <= residual_len < r_len:
        raise ValueError(f"residual_len: expected 0 <= residual_len < {r_len}, got {residual_len}")
    if not 1 <= q_len <= quantized_len + residual_len:
        raise ValueError(f"q_len: expected 1 <= q_len <= seq_len ({quantized_len + residual_len}),"
                         f" got {q_len}")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected 1..{MAX_SPLITS}, got {num_splits}")
    pd = PARAM_DTYPES[config.param_dtype]
    _expect("q", q, (batch, nq, q_len, d), Q_DTYPES[q_dtype])
    _expect("k_codes", k_codes, (batch, nkv, cap // 32, d * config.key_bits // 32, 32), np.uint32)
    _expect("k_params", k_params, (batch, nkv, cap // config.key_group_size, d, 2), pd)
    _expect("v_codes", v_codes, (batch, nkv, cap, d * config.value_bits // 32), np.uint32)
    _expect("v_params", v_params, (batch, nkv, cap, d // config.value_group_size, 2), pd)
    if config.scale_tokens:
        s = nkv if config.norm_scope == "head" else 1
        _expect("norms", norms, (batch, s, cap), np.float32)
    elif len(norms.shape) != 3:
        raise ValueError(f"norms: expected a 3-D array (any [1, 1, 1] without scale_tokens), "
                         f"got shape {tuple(norms.shape)}")
    else:
        _expect("norms", norms, tuple(int(x) for x in norms.shape), np.float32)
    _expect("k_res", k_res, (batch, nkv, r_len, d), Q_DTYPES[res_dtype])
    _expect("v_res", v_res, (batch, nkv, r_len, d), Q_DTYPES[res_dtype])
    out_ok = ("float32", np.dtype(Q_DTYPES[q_dtype]).name)
    if _dtype_name(out) not in out_ok:
        raise TypeError(f"out: expected dtype float32 or q's dtype ({q_dtype}, stored as "
                        f"{out_ok[1]}), got {_dtype_name(out)}")
    _expect("out", out, (batch, nq, q_len, d), _dtype_name(out))
    _expect("lse", lse, (batch, nq, q_len), np.float32)
    for name, shape in workspace_shapes(batch, nq, q_len, d, num_splits).items():
        if name not in workspace:
            raise ValueError(f"workspace: expected an array named {name!r}, "
                             f"got {sorted(workspace)}")
        _expect(f"workspace[{name!r}]", workspace[name], shape, WORKSPACE_DTYPES[name])
    # the merge kernel reads rows of these as 16-byte vectors
    for name, x in (("k_res", k_res), ("v_res", v_res),
                    ("workspace['split_acc']", workspace["split_acc"])):
        ptr = device_pointer(x)
        if ptr % 16:
            raise ValueError(f"{name}: expected a 16-byte aligned base address, got {ptr:#x}")
