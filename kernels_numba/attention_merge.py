"""Merge kernel of decode attention: the splits' partials (and the residual tokens) into ``out``
and ``lse``.

Finishes :func:`oscar.reference.attention.decode_attention` after a split kernel (v1,
attention_v1.py, always; v3, attention_mma.py, unless its last blocks merged: attention_fused.py).
``attention.decode_attention`` launches it; ``attention._build_merge`` and ``_merge_kernel``
build and compile it.

One block (128 threads = 4 warps) per (batch, query head, row). Takes the residual blocks'
partial when there is one (``res_slot``), else computes the residual scores itself (16-byte
residual rows shared by the lanes of a row), merges the splits and the residual by log-sum-exp
(warp-shuffle block reductions), sums the splits' ``acc`` (4 channels per lane, splits over the
warps), un-rotates once in warp 0's registers (``fwht_warp``, rotate_values), adds the residual
values and writes ``out`` (float32 or q's dtype, rounded once) and ``lse`` (natural log).

``out_dtype`` is float32 or q's dtype: the kernel rounds the float32 result once on the store
(round to nearest even, as torch's ``.to``), so a caller needs no cast kernel.

``res_slot`` (a kernel argument) = 1: the split kernel's residual blocks have computed the
residual tokens' partial (max, sum, unrotated value sum) at workspace slot ``num_splits``; the
merge weighs it like a split and adds its value sum after the inverse rotation, and does not
read the residual arrays. 0: the merge scores the residual itself, as follows.

Latency is what matters here (at batch 1 the whole decode step is a few microseconds of
dependent round trips), so every global load that does not depend on another is issued first:
the query row, the split maxima and sums, and the residual keys and values of the first round,
as 16-byte read-only loads (:func:`merge_geometry`: lane ``l`` reads chunk ``l % lpr`` of token
``l // lpr`` of each token group, so a warp's load is 512 contiguous bytes). Residual scores are
partial dot products reduced over the ``lpr`` lanes of a row by ``shfl_xor``; the residual value
sum is accumulated in the same registers and reduced over the tokens of a warp by shuffles, then
over the warps through shared memory. The quantized value sum takes one 16-byte row chunk (4
channels) per lane and the splits round-robin over the warps, 8 loads in flight per lane.

Shared memory (static, float32): ``D (1 + 2 * NUM_WARPS) + residual_length + max_splits + 2 *
NUM_WARPS + 1`` floats. Limits: ``num_splits <= max_splits <= 2 * NUM_THREADS`` (each thread reads
at most two splits' statistics); ``k_res``, ``v_res`` and ``split_acc`` 16-byte aligned (the
launcher checks).
"""

from __future__ import annotations

import math

from ._compat import SIMULATOR, cuda, np
from . import attention_residual as _res
from .common import LEN_QUANTIZED, LEN_RESIDUAL, LEN_START, fwht_warp

if SIMULATOR:
    from .ptx_sim import global_address, ldg4, uint_as_float
else:
    from .ptx import global_address, ldg4, uint_as_float

#: Threads per block: 4 warps (the block reductions below take NUM_WARPS warp values).
NUM_THREADS = 128
WARP_SIZE = 32
NUM_WARPS = NUM_THREADS // WARP_SIZE
#: 16-byte residual chunks a lane keeps in flight per round (registers: 4 words each for keys
#: and for values). Tests lower it to run the several-rounds path on tiny shapes.
MERGE_LANE_CHUNKS = 16


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


def merge_geometry(head_dim, residual_length, res_dtype):
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


def build_merge(head_dim, residual_length, res_dtype, rotate_values, load_q, store,
                hadamard_scale, max_splits):
    """Python function of the merge kernel for one compile-time configuration: ``load_q`` turns
    a stored query element into float32, ``store`` a float32 into an element of ``out``,
    ``hadamard_scale`` is float32(1/sqrt(D)), ``max_splits`` sizes the split weights."""
    D, R = head_dim, residual_length
    NT, NW = NUM_THREADS, NUM_WARPS
    SPLITS_MAX = max_splits
    ROTATE = bool(rotate_values)
    HS = hadamard_scale
    geo = merge_geometry(D, R, res_dtype)
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
                     residual_len, num_splits, res_slot, lengths):
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
        # the row's own lengths (the host's quantized_len, residual_len are bounds)
        row_ql = lengths[b, LEN_QUANTIZED]
        row_rl = lengths[b, LEN_RESIDUAL]
        first = lengths[b, LEN_START]
        last = row_ql + row_rl - lq + i  # last visible position
        # residual tokens this row scores (causal rows of a multi-token query see fewer): none
        # when the split kernel's residual blocks have computed their partial (block-uniform)
        has_slot = res_slot != 0
        nres = 0 if has_slot else min(row_rl, last - row_ql + 1)

        qv = cuda.shared.array(D, np.float32)
        sr = cuda.shared.array(R, np.float32)  # residual scores, then p
        part = cuda.shared.array((NW, D), np.float32)  # per-warp residual value sums
        qpart = cuda.shared.array((NW, D), np.float32)  # per-warp quantized value sums
        redm = cuda.shared.array(NW, np.float32)  # warp maxima (block max)
        reds = cuda.shared.array(NW, np.float32)  # warp sums (block sum)
        wsp = cuda.shared.array(SPLITS_MAX, np.float32)  # split weights exp(m_split - M)
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
                if row_ql + t < first:  # before the row's first visible token
                    s = neg_inf
                if t < nres:
                    m = max(m, s)
                    if lane % LPR == 0:
                        sr[t] = s
        m = _block_max(redm, m, tid)
        if m == neg_inf:  # a row that sees no token (an empty row); keeps exp() finite
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
                # a row that saw no token (empty, total 0) gives zeros, as the reference
                out[b, hq, i, c] = store((o + r) / total if total != ZERO_F else ZERO_F)
            if lane == 0:
                lse[b, hq, i] = m + math.log(total) if total != ZERO_F else neg_inf

    return merge_kernel
