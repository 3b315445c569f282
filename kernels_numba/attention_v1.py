"""Split kernel v1 of decode attention: float32 on CUDA cores, one 32-token tile per block.

Computes the same partials as the v3 split kernel (attention_mma.py; per (batch, query head,
row, split): running max, sum of exps and the unnormalized rotated value sum) for
:func:`oscar.reference.attention.decode_attention`; the merge kernel (attention_merge.py)
finishes them.

Why it is still here: ``attention._build_split`` runs it for every configuration the v3 kernel
does not take (``attention_mma.unsupported`` returns a reason), i.e. any of

* more than 8 query rows per KV head (``G * q_len > 8``, e.g. G = 4 with q_len >= 3),
* float32 (scale, min) parameters (``param_dtype="float32"``),
* value groups of fewer than 16 channels, or more than 8 value groups per head,
* head_dim not a multiple of 16, ``head_dim * key_bits`` or ``head_dim * value_bits`` not a
  multiple of 128 (e.g. head_dim 32 at 2 bits),
* v3's static shared memory over 48 KB (e.g. head_dim 256 with value groups of 32 channels,
  head_dim 128 with 8-bit keys and values),

and for every configuration when ``attention.SPLIT_VERSION == 1``. It has no residual blocks
and no fused merge: the merge kernel always runs after it and scores the residual tokens.

Grid ``(batch * num_kv_heads, num_splits)``; 128 threads = 4 warps. The block takes the G query
heads sharing its KV head and all q_len rows together (``rows = G * q_len``), so every packed
word is read from memory once, and a contiguous range of 32-token tiles: ``ceil(tiles /
num_splits)`` rounded up to whole key groups, so a split always starts a group (trailing splits
may be empty).
It loads its queries once into shared memory, rotates them (``fwht_shared``) and multiplies by
``scale``. Per key group it folds the dequantization into the query: ``q'_c = q_c * scale_c``
and ``kmin_r = sum_c q_c * min_c``, so that ``q . u_hat_t = sum_c q'_c * code_tc + kmin_r``
(one FMA per code and row).
Per tile:

QK   thread = (slot = warp, lane = token of the tile). A warp reads word w of its 32 tokens as
     128 contiguous bytes (the key layout of reference/pack.py). Warps split the rows (``RG`` row
     groups) and, when rows < 4, the key words (``WSPLIT`` word slices); each thread unpacks a
     code once and uses it for all its rows. Partial dots go to shared memory and are summed,
     masked and scaled by n_t in a second pass.
softmax  online, per row: running max m, sum l, rescale factor alpha (empty rows keep m = -inf,
     l = 0, alpha = 1: no exp(-inf + inf) anywhere).
PV   the tile's value words (32 token rows, contiguous) and (scale, min) are staged in shared
     memory with coalesced loads; ``ps[r, t, g] = p_rt * vscale_tg`` and ``pmin[r, g] = sum_t
     p_rt * vmin_tg`` fold the value dequantization, so each code costs one FMA per row. Thread t
     owns channels ``t % min(D, 128) + 128 * j`` and rows ``t // min(D, 128) + (128 // min(D,
     128)) * k``; its accumulators live in registers.

Writes per (b, hq, i, split): the running max, the sum of exps and the unnormalized rotated
value sum ``acc[D]`` (float32 workspace). Splits with no visible token write (-inf, 0, 0).

Shared memory (static, float32 unless noted): queries and pre-scaled queries ``2 * rows * D``;
scores ``rows * 32`` plus partials ``WSPLIT * rows * 32``; value words ``32 * D * value_bits /
32`` (uint32); value params ``2 * 32 * D / gv``; ``ps = rows * 32 * D / gv`` (replaced by p *
scale on the fly when it does not fit) and ``pmin``; 9.6 KB for Llama-3.1-8B decode (rows 4, D
128). 7 barriers per tile (8 on a key group's first tile).

Limits: head_dim a power of two in 32..256; key/value bits 2, 4, 8; key groups 32/64/128; any
value group of the configuration; rows at most 128 and small enough that the kernel fits in 48
KB of static shared memory (e.g. rows <= 32 at D = 128, <= 16 at D = 256; else ValueError).

Float32 everywhere; codes become floats with the exponent trick (exact for codes < 2**23) on the
GPU, a plain conversion in the simulator. The simulator has no warp shuffles, so all reductions
go through shared memory and ``syncthreads``. Verified on an H200 with compute-sanitizer
memcheck/racecheck. Known costs (why v3 replaced it where it can: docs/kernels.md): per-row
serial loops over the 32 scores of a tile (max, sum, pmin), 64-bit index arithmetic with Python
floor-division semantics, float32 FMAs instead of packed half2 / dp4a / mma; on the H200 255
registers/thread, 12% occupancy.
"""

from __future__ import annotations

import functools
import math

from ._compat import SIMULATOR, cuda, np
from .common import (LEN_QUANTIZED, LEN_RESIDUAL, LEN_START, fwht_shared, int_as_float,
                     split_block, value_code_location, value_param_location)

#: Threads per block: 4 warps, enough to overlap the phases of neighbouring blocks on one SM
#: while keeping the per-tile work per thread large.
NUM_THREADS = 128
WARP_SIZE = 32
NUM_WARPS = NUM_THREADS // WARP_SIZE
#: Tokens per key tile: the packed key layout stores word w of 32 consecutive tokens in 128
#: contiguous bytes (reference/pack.py TILE_TOKENS), read by one warp, lane = token.
TILE_TOKENS = 32
#: Threads per row of the key-group min fold (then one thread sums the partials): fewer
#: barriers than a tree.
REDUCE_FAN = 16
#: Static shared memory per block that needs no opt-in on any architecture.
SHARED_MEMORY_LIMIT = 48 * 1024
#: float32 2**23: OR-ing a code < 2**23 into its mantissa gives 2**23 + code exactly.
_MAGIC_BITS = 0x4B000000
_MAGIC_FLOAT = 8388608.0

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


def _pow2_ceil(n):
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _split_layout(key_bits, value_bits, key_group_size, value_group_size, head_dim, rows):
    """Compile-time work split of the kernel and its shared-memory bytes (see the spec sheet)."""
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


def build_split_v1(key_bits, value_bits, key_group_size, value_group_size, head_dim, gqa, q_len,
                   rotate_keys, scale_tokens, norm_per_head, load_q, hadamard_scale):
    """Python function of the v1 split kernel for one compile-time configuration (the arguments
    of ``attention_mma.build_split_v3``, without residual blocks or fused merge): ``load_q``
    turns a stored query element into float32, ``hadamard_scale`` is float32(1/sqrt(D)).
    ValueError when the rows do not fit (see Limits). Per-row lengths and first visible tokens
    come from ``lengths`` as in v3."""
    D, G, LQ = head_dim, gqa, q_len
    ROWS = G * LQ
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
    HS = hadamard_scale
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
                     out, lse, counter, fuse, lengths):
        tid = cuda.threadIdx.x
        lane = tid % TILE_TOKENS
        slot = tid // TILE_TOKENS
        b, kvh, split, t_begin, t_end = split_block(cuda.blockIdx.x, k_codes.shape[1],
                                                    quantized_len, num_splits, TPG, 0)
        row_ql = lengths[b, LEN_QUANTIZED]  # the row's own lengths (the host's are bounds)
        seq_len = row_ql + lengths[b, LEN_RESIDUAL]
        first = lengths[b, LEN_START]
        t_end = min(t_end, row_ql // TILE_TOKENS)
        t_begin = max(t_begin, first // (TILE_TOKENS * TPG) * TPG)
        nh = kvh if NORM_PER_HEAD else 0
        neg_inf = np.float32(-math.inf)

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
                if t <= seq_len - LQ + r % LQ and t >= first:
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

    return split_kernel
