"""Split kernel v2 of decode attention: one 32-token tile per warp, few barriers.

Computes the same partials as ``attention._build_split`` (per (batch, query head, row, split):
running max, sum of exps and the unnormalized rotated value sum) for
:func:`oscar.reference.attention.decode_attention`; ``attention.decode_attention`` uses this
kernel whenever its shared memory fits (``fits``), the v1 kernel otherwise.

Why a second kernel: the v1 kernel spreads each 32-token tile over the whole block (4 warps)
with six block barriers and single-thread serial loops per tile; on the H200 it ran at 255
registers/thread and 12% occupancy (ncu, B=1, T=32K: 302 us for 25 MB). Here each warp owns
whole tiles and keeps its own online-softmax state, so the block synchronizes only to stage data.

Grid ``(batch * num_kv_heads, num_splits)``, 128 threads = 4 warps. A split is a contiguous range
of whole key groups; warp w takes key groups w, w + 4, ... of the split, tile by tile ("step").
Per step, per warp:

* new key group: lanes fold the group's (scale, min) into the rotated, scaled queries,
  ``qp[c, r] = qs[r, c] * scale_c`` (shared, per warp) and ``kmin_r = sum_c qs[r, c] * min_c``
  (lane partials reduced through shared memory, kept in registers);
* QK, lane = token: the warp reads word w of its 32 tokens as 128 contiguous bytes (the key tile
  layout), turns each code into a float with the exponent trick and does one FMA per row;
  ``s = (dot + kmin) * n_t`` (scale is in qs), causal mask;
* online softmax per row in registers (every lane holds the same running max; the tile max goes
  through shared memory; each lane keeps its own partial sum of exps);
* PV, lane = channels ``[lane * D/32, (lane + 1) * D/32)`` (one value group): for each of the 32
  tokens it reads its codes (docs/format.md, "Value tiles") and (scale, min),
  ``acc[r, c] += (p * scale) * code`` and ``accm[r] += p * min`` (the value dequantization
  folded into p).

At the end the 4 warps merge their states by log-sum-exp through shared memory and write the
partials. Shared memory (float32): ``ROWS*D`` (qs) + ``4*D*ROWS`` (qp, reused for the merge)
+ ``2*4*ROWS*32``; 14 KB for Llama-3.1-8B shapes (ROWS = 4, D = 128).
"""

from __future__ import annotations

import math

from ._compat import cuda, np
from .common import (fwht_shared, split_block, value_code_location, value_param_location,
                     write_empty_split)

NUM_THREADS = 128
NUM_WARPS = 4
TILE = 32
SHARED_LIMIT = 48 * 1024


def shared_bytes(rows: int, head_dim: int) -> int:
    return 4 * (rows * head_dim * (1 + NUM_WARPS) + 2 * NUM_WARPS * rows * TILE
                + 2 * NUM_WARPS * rows)


def fits(rows: int, head_dim: int) -> bool:
    """True when the v2 kernel's static shared memory fits in 48 KB."""
    return shared_bytes(rows, head_dim) <= SHARED_LIMIT


def build_split_v2(key_bits, value_bits, key_group_size, value_group_size, head_dim, gqa, q_len,
                   rotate_keys, scale_tokens, norm_per_head, load_q, code_f32, hadamard_scale):
    """Python function of the v2 split kernel for one compile-time configuration."""
    D, G, LQ = head_dim, gqa, q_len
    ROWS = G * LQ
    KB, VB = key_bits, value_bits
    KCPW = 32 // KB
    KW = D // KCPW
    KMASK, VMASK = (1 << KB) - 1, (1 << VB) - 1
    TPG = key_group_size // TILE
    GV = value_group_size
    NGV = D // GV
    CPL = D // TILE  # value channels per lane
    VW = D * VB // 32  # words per token row of v_codes
    NACC = ROWS * CPL  # accumulators per lane (a literal: local.array needs a constant shape)
    NT, NW = NUM_THREADS, NUM_WARPS
    ROTATE, SCALE_TOKENS, NORM_PER_HEAD = bool(rotate_keys), bool(scale_tokens), bool(norm_per_head)
    HS = hadamard_scale

    def split_kernel(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, ws_max,
                     ws_sum, ws_acc, scale, quantized_len, residual_len, num_splits, res_blocks,
                     out, lse, counter, fuse):
        tid = cuda.threadIdx.x
        lane = tid % TILE
        warp = tid // TILE
        b, kvh, split, t_begin, t_end = split_block(k_codes.shape[1], quantized_len, num_splits,
                                                    TPG, 0)
        nh = kvh if NORM_PER_HEAD else 0
        neg_inf = np.float32(-math.inf)
        seq_len = quantized_len + residual_len
        if t_begin >= t_end:  # block-uniform
            write_empty_split(ws_max, ws_sum, ws_acc, b, kvh, split, tid, NT, ROWS, D, G, LQ)
            return

        qs = cuda.shared.array((ROWS, D), np.float32)
        qp = cuda.shared.array((NW, D, ROWS), np.float32)
        red = cuda.shared.array((NW, ROWS, TILE), np.float32)
        pw = cuda.shared.array((NW, ROWS, TILE), np.float32)
        mw = cuda.shared.array((NW, ROWS), np.float32)
        lw = cuda.shared.array((NW, ROWS), np.float32)

        for idx in range(tid, ROWS * D, NT):
            r = idx // D
            qs[r, idx % D] = load_q(q[b, kvh * G + r // LQ, r % LQ, idx % D])
        if ROTATE:
            fwht_shared(qs, ROWS, D, tid, NT)
            qfac = scale * np.float32(HS)
        else:
            cuda.syncthreads()
            qfac = scale
        for idx in range(tid, ROWS * D, NT):
            qs[idx // D, idx % D] *= qfac
        cuda.syncthreads()

        m = cuda.local.array(ROWS, np.float32)
        lsum = cuda.local.array(ROWS, np.float32)
        kmin = cuda.local.array(ROWS, np.float32)
        accm = cuda.local.array(ROWS, np.float32)
        dots = cuda.local.array(ROWS, np.float32)
        acc = cuda.local.array(NACC, np.float32)
        for r in range(ROWS):
            m[r] = neg_inf
            lsum[r] = np.float32(0.0)
            kmin[r] = np.float32(0.0)
            accm[r] = np.float32(0.0)
        for i in range(NACC):
            acc[i] = np.float32(0.0)

        c0 = lane * CPL
        vg = c0 // GV
        groups = (t_end - t_begin) // TPG
        nsteps = (groups + NW - 1) // NW * TPG
        for step in range(nsteps):
            tile = t_begin + ((step // TPG) * NW + warp) * TPG + step % TPG
            active = tile < t_end
            tok = tile * TILE + lane
            # (1) new key group: fold (scale, min) into the queries
            if step % TPG == 0:  # block-uniform
                if active:
                    grp = tile // TPG
                    for r in range(ROWS):
                        dots[r] = np.float32(0.0)
                    for j in range(D // TILE):
                        c = lane + TILE * j
                        ksc = np.float32(k_params[b, kvh, grp, c, 0])
                        kmn = np.float32(k_params[b, kvh, grp, c, 1])
                        for r in range(ROWS):
                            qv = qs[r, c]
                            qp[warp, c, r] = qv * ksc
                            dots[r] += qv * kmn
                    for r in range(ROWS):
                        red[warp, r, lane] = dots[r]
                cuda.syncthreads()
                if active:
                    for r in range(ROWS):
                        s = np.float32(0.0)
                        for u in range(TILE):
                            s += red[warp, r, u]
                        kmin[r] = s
            # (2) QK: lane = token
            if active:
                for r in range(ROWS):
                    dots[r] = np.float32(0.0)
                for w in range(KW):
                    word = k_codes[b, kvh, tile, w, lane]
                    for e in range(KCPW):
                        cf = code_f32((word >> np.uint32(KB * e)) & np.uint32(KMASK))
                        c = w * KCPW + e
                        for r in range(ROWS):
                            dots[r] += qp[warp, c, r] * cf
                nt = np.float32(1.0)
                if SCALE_TOKENS:
                    nt = norms[b, nh, tok]
                for r in range(ROWS):
                    s = neg_inf
                    if tok <= seq_len - LQ + r % LQ:
                        s = (dots[r] + kmin[r]) * nt
                    dots[r] = s
                    pw[warp, r, lane] = s
            cuda.syncthreads()
            # (3) online softmax (every lane computes the same row maxima)
            if active:
                for r in range(ROWS):
                    # NaN-propagating maxima: a NaN score (from NaN keys, whose groups hold NaN
                    # parameters) must reach this row's output, never be skipped by max()
                    mt = neg_inf
                    for u in range(TILE):
                        v = pw[warp, r, u]
                        if v > mt or v != v:
                            mt = v
                    m_new = m[r]
                    if mt > m_new or mt != mt:
                        m_new = mt
                    alpha = np.float32(1.0)
                    if m_new != neg_inf:
                        alpha = math.exp(m[r] - m_new)
                    p = np.float32(0.0)
                    if dots[r] != neg_inf:
                        p = math.exp(dots[r] - m_new)
                    m[r] = m_new
                    lsum[r] = lsum[r] * alpha + p
                    accm[r] *= alpha
                    for j in range(CPL):
                        acc[r * CPL + j] *= alpha
                    dots[r] = p
            cuda.syncthreads()
            if active:
                for r in range(ROWS):
                    pw[warp, r, lane] = dots[r]
            cuda.syncthreads()
            # (4) PV: lane = channels c0 .. c0 + CPL - 1
            if active:
                for u in range(TILE):
                    t = tile * TILE + u
                    # the tiled order (docs/format.md 2c); the min is 8 rows after the scale
                    vr, vs, vp = value_param_location(u, vg, 0, NGV)
                    vsc = np.float32(v_params[b, kvh, tile * TILE + vr, vs, vp])
                    vmn = np.float32(v_params[b, kvh, tile * TILE + vr + 8, vs, vp])
                    for r in range(ROWS):
                        pr = pw[warp, r, u]
                        accm[r] += pr * vmn
                        dots[r] = pr * vsc
                    for j in range(CPL):  # code (u, c0 + j) of the tiled value layout
                        f, sh = value_code_location(u, c0 + j, D, VB)
                        word = v_codes[b, kvh, tile * TILE + f // VW, f % VW]
                        cf = code_f32((word >> np.uint32(sh)) & np.uint32(VMASK))
                        for r in range(ROWS):
                            acc[r * CPL + j] += dots[r] * cf
            cuda.syncthreads()

        # merge the warps: per-lane partial sums -> per-warp sums; (m, l, acc) by log-sum-exp
        for r in range(ROWS):
            red[warp, r, lane] = lsum[r]
            for j in range(CPL):
                qp[warp, c0 + j, r] = acc[r * CPL + j] + accm[r]
        if lane == 0:
            for r in range(ROWS):
                mw[warp, r] = m[r]
        cuda.syncthreads()
        if lane < ROWS:
            s = np.float32(0.0)
            for u in range(TILE):
                s += red[warp, lane, u]
            lw[warp, lane] = s
        cuda.syncthreads()
        for idx in range(tid, ROWS * D, NT):
            r = idx // D
            c = idx % D
            mm = neg_inf
            for w in range(NW):  # NaN-propagating: a warp that met a NaN score has m = NaN
                if mw[w, r] > mm or mw[w, r] != mw[w, r]:
                    mm = mw[w, r]
            a = np.float32(0.0)
            if mm != neg_inf:
                for w in range(NW):
                    if mw[w, r] != neg_inf:
                        a += qp[w, c, r] * math.exp(mw[w, r] - mm)
            ws_acc[b, kvh * G + r // LQ, r % LQ, split, c] = a
        if tid < ROWS:
            mm = neg_inf
            for w in range(NW):
                if mw[w, tid] > mm or mw[w, tid] != mw[w, tid]:
                    mm = mw[w, tid]
            s = np.float32(0.0)
            if mm != neg_inf:
                for w in range(NW):
                    if mw[w, tid] != neg_inf:
                        s += lw[w, tid] * math.exp(mw[w, tid] - mm)
            ws_max[b, kvh * G + tid // LQ, tid % LQ, split] = mm
            ws_sum[b, kvh * G + tid // LQ, tid % LQ, split] = s

    return split_kernel
