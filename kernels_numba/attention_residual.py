"""The residual tokens' partial of decode attention, as one extra block of the split grid.

The residual (the last ``residual_len < R`` tokens, kept unquantized in ``res_dtype``) is seen by
all G query heads of a KV head. The merge kernel used to score it once per query head, after the
split kernel had finished: at batch 1 that dependent chain (scores, block max, exps, block sum,
value pass) was about a fifth of a 4K-token decode step. Here one block per (batch, KV head)
computes it for all ``rows = G * q_len`` query rows *while* the split blocks stream the packed
cache, and writes it as one more partial: running max (natural-log units), sum of exps and the
value sum in the *unrotated* basis, at split slot ``num_splits`` of the workspace. The merge adds
that slot after its inverse rotation of the quantized sum.

Block of 128 threads, for the (batch, kv head) it is given:

1. the query rows, times ``scale``, into ``qs`` (shared, row stride ``qs_stride``), while each
   thread's first key row is already in flight (16-byte read-only loads);
2. scores: thread ``t`` takes residual tokens ``t, t + 128, ...`` whole: ``rows`` dot products of
   its key row with the query rows (16-byte broadcast reads of ``qs``), no shuffles; visible
   scores go to a ``rows x R`` float32 buffer at shared byte address ``pb``;
3. per-row block max and sum of exps (warp shuffles, then 4 partials per row through ``red_m`` /
   ``red_s``); ``p = exp(s - m)`` replaces the score (0 where a causal row does not see the token);
4. values: warp ``w`` owns channels ``[w D/4, (w + 1) D/4)``: ``D/4 * es / 16`` lanes of a token
   read one 16-byte chunk each, the other lane bits step through the tokens; the per-lane sums
   are reduced over the token lanes by ``shfl_xor`` and written straight to the workspace. The
   first two rounds of value loads (all of them up to ``2 * STEP`` tokens: 128 at head_dim 128
   bf16) are issued right after the scores, so their round trip overlaps the softmax.

Supported (:func:`unsupported`) when ``head_dim * element size`` is a power of two from 64 to
2048 bytes (a warp's channel slice is whole 16-byte chunks that divide 32 lanes: head_dim 32 to
1024 at 16 bits), at most ``ROWS_MAX`` rows and ``rows * R`` floats fit the scratch the caller
lends. Otherwise the merge kernel scores the residual itself, as before.

Precision: the same float32 operations as the merge's residual path (a different summation order
of the D-term dot products and of the T-term value sums), within the bound of
tests/test_kernels_attention.py.
"""

from __future__ import annotations

import math

from ._compat import SIMULATOR, cuda, np

if SIMULATOR:
    from .ptx_sim import (f16x2_hi, f16x2_lo, global_address, ldg4, lds1f, lds4f,
                          shared_address, sts1f, uint_as_float)
else:
    from .ptx import (f16x2_hi, f16x2_lo, global_address, ldg4, lds1f, lds4f, shared_address,
                      sts1f, uint_as_float)

NUM_THREADS = 128
NUM_WARPS = 4
WARP_SIZE = 32
FULL = 0xFFFFFFFF
#: Query rows per KV head the split kernels handle here (v3 takes at most 32, in row groups beyond
#: 8; this module's blocks take ROWS_PER_BLOCK rows each whatever the total).
ROWS_MAX = 32
#: Query rows one residual block scores: 1 gives each (batch, query head, row) its own block, as
#: many as merge blocks. A block with one warp per scheduler has no latency hiding, so its time
#: is its instruction chain: 4 rows a block took ~15 us at batch 1 (H200), longer than the split
#: blocks of a 4K-token step.
ROWS_PER_BLOCK = 1
#: 16-byte chunks of a key row a thread keeps in flight (4 registers each).
KEY_CHUNKS = 16
#: At most this many 16-byte value chunks per lane and round (two rounds in flight). Tests lower
#: both to run the several-rounds paths on tiny shapes.
VALUE_CHUNKS = 8


def element_size(res_dtype: str) -> int:
    return 4 if res_dtype == "float32" else 2


def chunk_element(res_dtype: str):
    """Device function ``element(w, o, j)``: float32 value of element ``j`` (0 .. 16 / es - 1)
    of the 16-byte chunk held in words ``w[o] .. w[o + 3]`` (float32, float16 or bfloat16 bits).
    Shared by the merge kernel's residual path."""
    es = element_size(res_dtype)
    bf16 = res_dtype == "bfloat16"
    hi16 = np.uint32(0xFFFF0000)
    sh16 = np.uint32(16)

    @cuda.jit(device=True)
    def element(w, o, j):
        if es == 4:
            return uint_as_float(w[o + j])
        x = w[o + (j >> 1)]
        if bf16:
            if j & 1:
                return uint_as_float(x & hi16)
            return uint_as_float(x << sh16)
        if j & 1:
            return f16x2_hi(x)
        return f16x2_lo(x)

    return element


def unsupported(head_dim: int, residual_length: int, rows: int, res_dtype: str,
                scratch_words: int):
    """None when :func:`build_residual` handles this shape with ``scratch_words`` 32-bit words of
    shared scratch for the scores, else the reason (a string)."""
    row_bytes = head_dim * element_size(res_dtype)
    if row_bytes & (row_bytes - 1) or not 64 <= row_bytes <= 2048:
        return (f"head_dim {head_dim} in {res_dtype} is not a power-of-two row of 64 to 2048 "
                "bytes")
    if rows > ROWS_MAX:
        return f"{rows} query rows per KV head (at most {ROWS_MAX})"
    rb = min(rows, ROWS_PER_BLOCK)
    if rb * residual_length > scratch_words:
        return (f"{rb} rows x {residual_length} residual scores exceed the {scratch_words} "
                "words of scratch")
    return None


def _largest_divisor_at_most(n, cap):
    return max(k for k in range(1, min(n, cap) + 1) if n % k == 0)


def blocks_per_head(gqa, q_len, rows_per_block=None):
    """Residual blocks per (batch, KV head): ``ceil(rows / rows_per_block)``."""
    rb = ROWS_PER_BLOCK if rows_per_block is None else rows_per_block
    return -(-gqa * q_len // rb)


def build_residual(head_dim, residual_length, gqa, q_len, res_dtype, load_q, qs_stride,
                   rows_per_block=None):
    """Device function ``residual_partial(q, k_res, v_res, ws_max, ws_sum, ws_acc, scale,
    quantized_len, residual_len, b, kvh, rb, slot, qs, pb, start)``: the residual partial of
    query rows ``r = j * q_len + i`` (head ``kvh * gqa + j``, position ``i``) of batch ``b`` with
    ``rb * rows_per_block <= r < (rb + 1) * rows_per_block``, written at split index ``slot`` of
    the workspace. All 128 threads of the block call it. ``quantized_len``, ``residual_len`` and
    ``start`` are the row's own (residual token t sits at position ``quantized_len + t`` and is
    masked before ``start``).

    ``qs``: float32 shared ``[>= rows_per_block, >= head_dim]`` with row stride ``qs_stride``
    floats (a multiple of 4, 16-byte aligned); ``pb``: shared byte address (16-byte aligned) of
    ``rows_per_block * residual_length`` float32 of scratch.
    """
    D, R, G, LQ = head_dim, residual_length, gqa, q_len
    NROWS = G * LQ
    ROWS = ROWS_PER_BLOCK if rows_per_block is None else rows_per_block  # rows of this block
    NT, NW = NUM_THREADS, NUM_WARPS
    ES = element_size(res_dtype)
    VPL = 16 // ES  # elements per 16-byte chunk
    NCK = D // VPL  # chunks per row
    KP = _largest_divisor_at_most(NCK, KEY_CHUNKS)  # key chunks per load round
    NKP = NCK // KP
    NKW = 4 * KP
    TPT = -(-R // NT)  # token rounds of the score pass
    ONE_PASS = TPT == 1 and NKP == 1  # the first key loads can fly before the query barrier
    CHW = D // NW  # value channels per warp
    CLW = CHW // VPL  # lanes per token in the value pass
    TLW = WARP_SIZE // CLW  # tokens per warp-wide load
    NACC = ROWS * VPL
    # value chunks per lane and round: the round's FMAs (NVB * NACC) stay small enough for
    # the compiler to unroll, or the accumulators would live in local memory
    NVB = max(1, min(VALUE_CHUNKS, 128 // NACC))
    NVW = 4 * NVB
    STEP = TLW * NVB  # tokens per round of a lane
    ROW_B = D * ES
    QS = qs_stride
    ZERO_F = np.float32(0.0)
    element = chunk_element(res_dtype)

    @cuda.jit(device=True)
    def load_key(kbase, t, pc, nmax, kw):
        """Chunks ``pc * KP ..`` of key row ``t`` (zeros past ``nmax``) into ``kw``."""
        for c in range(KP):
            if t < nmax:
                w0, w1, w2, w3 = ldg4(kbase + np.int64(t * ROW_B + 16 * (pc * KP + c)))
            else:
                w0 = w1 = w2 = w3 = np.uint32(0)
            kw[4 * c] = w0
            kw[4 * c + 1] = w1
            kw[4 * c + 2] = w2
            kw[4 * c + 3] = w3

    @cuda.jit(device=True)
    def dot(kw, qb, r, pc):
        """Chunks ``pc * KP ..`` of a key row (``kw``) against query row ``r`` of ``qs``."""
        a = ZERO_F
        for c in range(KP):
            ch = (pc * KP + c) * VPL
            for h in range(VPL // 4):
                q0, q1, q2, q3 = lds4f(qb, 4 * (r * QS + ch + 4 * h))
                a += q0 * element(kw, 4 * c, 4 * h)
                a += q1 * element(kw, 4 * c, 4 * h + 1)
                a += q2 * element(kw, 4 * c, 4 * h + 2)
                a += q3 * element(kw, 4 * c, 4 * h + 3)
        return a

    @cuda.jit(device=True)
    def load_values(vbase, t0, nmax, vw):
        """This lane's chunk of value rows ``t0 + TLW * k`` (k < NVB; zeros past ``nmax``)."""
        for k in range(NVB):
            t = t0 + TLW * k
            if t < nmax:
                w0, w1, w2, w3 = ldg4(vbase + np.int64(t * ROW_B))
            else:
                w0 = w1 = w2 = w3 = np.uint32(0)
            vw[4 * k] = w0
            vw[4 * k + 1] = w1
            vw[4 * k + 2] = w2
            vw[4 * k + 3] = w3

    @cuda.jit(device=True)
    def add_values(pb, t0, nmax, vw, acc):
        """``acc[r, j] += p[r, t] v[t, j]`` over this lane's tokens ``t0 + TLW * k``."""
        for k in range(NVB):
            t = t0 + TLW * k
            if t < nmax:
                for r in range(ROWS):
                    p = lds1f(pb, 4 * (r * R + t))
                    for j in range(VPL):
                        acc[r * VPL + j] += p * element(vw, 4 * k, j)

    @cuda.jit(device=True)
    def residual_partial(q, k_res, v_res, ws_max, ws_sum, ws_acc, scale, quantized_len,
                         residual_len, b, kvh, rb, slot, qs, pb, start):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        neg_inf = np.float32(-math.inf)
        nmax = residual_len  # the last row sees every residual token
        # local row r is row r0 + r of the KV head; it sees residual tokens
        # t < nmax - (LQ - 1 - (r0 + r) % LQ) (causal; may be none)
        r0 = rb * ROWS
        kbase = global_address(k_res, (b, kvh, 0, 0))
        qb = shared_address(qs, (0, 0))
        kw = cuda.local.array(NKW, np.uint32)

        if ONE_PASS:
            load_key(kbase, tid, 0, nmax, kw)
        for idx in range(tid, ROWS * D, NT):
            rr = r0 + idx // D
            if rr < NROWS:
                qs[idx // D, idx % D] = load_q(q[b, kvh * G + rr // LQ, rr % LQ, idx % D]) * scale
        cuda.syncthreads()

        # --- scores: a thread per token, its whole key row against every query row; -inf
        # where a causal row does not see the token ------------------------------------------
        for u in range(TPT):
            t = tid + u * NT
            if t < nmax:
                for r in range(ROWS):
                    a = ZERO_F
                    for pc in range(NKP):
                        if not ONE_PASS and r == 0:
                            load_key(kbase, t, pc, nmax, kw)
                        a += dot(kw, qb, r, pc)
                    if t >= nmax - (LQ - 1 - (r0 + r) % LQ) or quantized_len + t < start:
                        a = neg_inf
                    sts1f(pb, 4 * (r * R + t), a)
        # the first two rounds of value loads fly during the softmax below (the key registers
        # are dead): at batch 1 their DRAM round trip was on the block's critical path
        tl = lane // CLW
        c0 = warp * CHW + (lane % CLW) * VPL
        vbase = global_address(v_res, (b, kvh, 0, 0)) + np.int64(c0 * ES)
        va = cuda.local.array(NVW, np.uint32)
        vb = cuda.local.array(NVW, np.uint32)
        load_values(vbase, tl, nmax, va)
        load_values(vbase, tl + STEP, nmax, vb)
        cuda.syncthreads()

        # --- softmax statistics: a warp per row (max, then p = exp(s - m) and its sum) --------
        for r in range(warp, min(ROWS, NROWS - r0), NW):
            rr = r0 + r
            m = neg_inf
            for t in range(lane, nmax, WARP_SIZE):
                m = max(m, lds1f(pb, 4 * (r * R + t)))
            for off in (16, 8, 4, 2, 1):
                m = max(m, cuda.shfl_xor_sync(FULL, m, off))
            lsum = ZERO_F
            for t in range(lane, nmax, WARP_SIZE):
                p = ZERO_F  # a row with no visible token has max -inf: weights 0, not NaN
                if m != neg_inf:
                    p = math.exp(lds1f(pb, 4 * (r * R + t)) - m)
                sts1f(pb, 4 * (r * R + t), p)
                lsum += p
            for off in (16, 8, 4, 2, 1):
                lsum += cuda.shfl_xor_sync(FULL, lsum, off)
            if lane == 0:
                ws_max[b, kvh * G + rr // LQ, rr % LQ, slot] = m
                ws_sum[b, kvh * G + rr // LQ, rr % LQ, slot] = lsum
        cuda.syncthreads()

        # --- values: warp w owns channels [w CHW, (w + 1) CHW); lanes step through tokens, two
        # rounds of loads in flight (the first two issued before the softmax) -----------------
        acc = cuda.local.array(NACC, np.float32)
        for j in range(NACC):
            acc[j] = ZERO_F
        for t0 in range(tl, nmax, 2 * STEP):
            add_values(pb, t0, nmax, va, acc)
            load_values(vbase, t0 + 2 * STEP, nmax, va)
            add_values(pb, t0 + STEP, nmax, vb, acc)
            load_values(vbase, t0 + 3 * STEP, nmax, vb)
        for j in range(NACC):
            a = acc[j]
            off = CLW
            while off < WARP_SIZE:
                a += cuda.shfl_xor_sync(FULL, a, off)
                off *= 2
            acc[j] = a
        for r in range(ROWS):  # every token lane holds the sums: lane tl writes rows r = tl mod TLW
            rr = r0 + r
            if r % TLW == tl and rr < NROWS:
                for j in range(VPL):
                    ws_acc[b, kvh * G + rr // LQ, rr % LQ, slot, c0 + j] = acc[r * VPL + j]

    return residual_partial
