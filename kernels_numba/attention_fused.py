"""The merge of decode attention, fused into the split kernel: the last block of each (batch, KV
head) to finish merges that head's partials and writes ``out`` and ``lse``.

At batch 1 a decode step is a few microseconds of dependent work, and the separate merge launch
cost a kernel boundary plus its own ramp (query row, split statistics, value sums: about 4.7 us
of device time at 4K tokens, H200). Here every block of the split grid (split blocks, empty
splits and residual blocks alike) ends with :func:`build_finish`'s ``finish``, which counts the
block's arrival on ``counter[b, kvh]`` with the protocol of CUTLASS's generic barrier: a
barrier (every thread's partial writes are issued), then one thread does ``fence.acq_rel.gpu``
(release, cumulative through the barrier) and a relaxed atomic add; the block that brings the
count to ``arrivals`` (all the blocks of that head) fences again (acquire), resets the counter to
0 for the next launch, and after a second barrier merges: a warp per query row reads the
``num_splits`` (+ 1 residual) partials from L2 (``ld.global.cg``: never a stale L1 line), each
lane its slot's max and sum once, takes the max, the weights ``exp(m_s - m)`` (kept in shared
scratch), their sum, the weighted value sum (4 channels per lane, 8 slots in flight),
un-rotates it in registers (``fwht_warp``), adds the residual partial (unrotated, loaded before
the value slots) and rounds once into ``out``'s dtype. Same float32 operations as the merge
kernel, in a different order. (Until the eleventh session every thread ran ``membar.gl`` before
the add and again after it: 0.6 us of a 3.7 us merge at B=1 4K, H200.)
"""

from __future__ import annotations

import math

from ._compat import SIMULATOR, cuda, np
from .common import fwht_warp

if SIMULATOR:
    from .ptx_sim import (fence_acq_rel_gpu, global_address, ldcg1f, ldcg4, lds1f, sts1f,
                          uint_as_float)
else:
    from .ptx import (fence_acq_rel_gpu, global_address, ldcg1f, ldcg4, lds1f, sts1f,
                      uint_as_float)

NUM_THREADS = 128
NUM_WARPS = 4
FULL = 0xFFFFFFFF
#: Value-sum slots a lane keeps in flight.
SLOTS_IN_FLIGHT = 8


def scratch_words(max_slots: int) -> int:
    """32-bit words of shared scratch ``finish`` needs (the weights, per warp)."""
    return NUM_WARPS * max_slots


def build_finish(head_dim, gqa, q_len, rotate_values, hadamard_scale, store, max_slots):
    """Device function ``finish(ws_max, ws_sum, ws_acc, out, lse, counter, b, kvh, num_splits,
    res_slot, arrivals, flag, wb)``. All 128 threads of a block call it after writing the
    block's partials; it returns at once in all but the last of the ``arrivals`` blocks of
    ``(b, kvh)``. ``res_slot``: 1 when slot ``num_splits`` holds the residual partial (value sum
    unrotated). ``flag``: an int32 shared array of 1; ``wb``: shared byte address of
    :func:`scratch_words` words; ``max_slots >= num_splits + res_slot``; ``store``: the float32
    -> out dtype conversion."""
    D, G, LQ = head_dim, gqa, q_len
    ROWS = G * LQ
    NW = NUM_WARPS
    CQ = D // 32  # channels per lane, consecutive (the fwht_warp layout)
    VEC = CQ % 4 == 0
    NV = CQ // 4 if VEC else CQ
    UN = max(1, SLOTS_IN_FLIGHT // max(1, NV))
    NREG = 4 * NV * UN if VEC else 1  # (without VEC the FMA loop loads its scalars itself)
    ROTATE = bool(rotate_values)
    HS = np.float32(hadamard_scale)
    MS = max_slots
    fwht_row = fwht_warp(D)
    ZERO_F = np.float32(0.0)

    @cuda.jit(device=True)
    def load_slots(ab, u0, num_splits, regs):
        """The 16-byte loads of value slots ``u0 .. u0 + UN - 1`` (past the last: clamped to it,
        weight 0) into ``regs``, all issued before any is used."""
        for uu in range(UN):
            u = min(u0 + uu, num_splits - 1)
            for v in range(NV):
                w0, w1, w2, w3 = ldcg4(ab + np.int64(4 * (u * D + 4 * v)))
                o = 4 * (uu * NV + v)
                regs[o] = w0
                regs[o + 1] = w1
                regs[o + 2] = w2
                regs[o + 3] = w3

    @cuda.jit(device=True)
    def finish(ws_max, ws_sum, ws_acc, out, lse, counter, b, kvh, num_splits, res_slot,
               arrivals, flag, wb):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        neg_inf = np.float32(-math.inf)
        cuda.syncthreads()  # every thread of the block has issued its partial writes
        if tid == 0:
            fence_acq_rel_gpu()  # release: the block's writes (through the barrier) come first
            old = cuda.atomic.add(counter, (b, kvh), np.int32(1))
            last = old == arrivals - 1
            if last:
                fence_acq_rel_gpu()  # acquire: every other block's partials are visible
                counter[b, kvh] = np.int32(0)  # ready for the next launch
            flag[0] = np.int32(1) if last else np.int32(0)
        cuda.syncthreads()
        if flag[0] == 0:
            return
        nslots = num_splits + res_slot
        wbase = wb + 4 * MS * warp
        acc = cuda.local.array(CQ, np.float32)
        rv = cuda.local.array(CQ, np.float32)  # the residual partial's value sum (unrotated)
        regs = cuda.local.array(NREG, np.uint32)
        for r in range(warp, ROWS, NW):
            hq = kvh * G + r // LQ
            i = r % LQ
            mb = global_address(ws_max, (b, hq, i, 0))
            sb = global_address(ws_sum, (b, hq, i, 0))
            ab = global_address(ws_acc, (b, hq, i, 0, 0)) + np.int64(4 * CQ * lane)
            # this lane's slot statistics in one round trip, kept for the weights (lanes past
            # 32 slots reload theirs: at most 32 blocks fuse). Preloading the value slots here
            # as well lost: 8 slots of 16-byte loads held across the exp and the shuffles spilled
            # (352 bytes, some in the tile loop; B=1 8K 18.0 vs 17.1 us)
            mu = neg_inf
            su = ZERO_F
            if lane < nslots:
                mu = ldcg1f(mb + np.int64(4 * lane))
                su = ldcg1f(sb + np.int64(4 * lane))
            m = mu
            for u in range(lane + 32, nslots, 32):
                m = max(m, ldcg1f(mb + np.int64(4 * u)))
            for off in (16, 8, 4, 2, 1):
                m = max(m, cuda.shfl_xor_sync(FULL, m, off))
            if m == neg_inf:  # a row that sees no token (an empty row); keeps exp() finite
                m = ZERO_F
            # an empty split (max -inf) weighs 0; a NaN max or sum still reaches the output
            total = ZERO_F
            if lane < nslots:
                w = ZERO_F
                if mu != neg_inf:
                    w = math.exp(mu - m)
                sts1f(wbase, 4 * lane, w)
                total = w * su
            for u in range(lane + 32, nslots, 32):
                mv = ldcg1f(mb + np.int64(4 * u))
                w = ZERO_F
                if mv != neg_inf:
                    w = math.exp(mv - m)
                sts1f(wbase, 4 * u, w)
                total += w * ldcg1f(sb + np.int64(4 * u))
            for off in (16, 8, 4, 2, 1):
                total += cuda.shfl_xor_sync(FULL, total, off)
            cuda.syncwarp()  # the weights, for every lane
            for k in range(CQ):
                acc[k] = ZERO_F
                rv[k] = ZERO_F
            if res_slot != 0:  # the residual partial's round trip overlaps the slots' below
                for k in range(CQ):
                    rv[k] = ldcg1f(ab + np.int64(4 * (num_splits * D + k)))
            for u0 in range(0, num_splits, UN):
                if VEC:
                    load_slots(ab, u0, num_splits, regs)
                for uu in range(UN):
                    u = u0 + uu
                    if u < num_splits:
                        wt = lds1f(wbase, 4 * u)
                        for v in range(NV):
                            if VEC:
                                o = 4 * (uu * NV + v)
                                for e in range(4):
                                    acc[4 * v + e] += wt * uint_as_float(regs[o + e])
                            else:
                                acc[v] += wt * ldcg1f(ab + np.int64(4 * (u * D + v)))
            if ROTATE:
                fwht_row(acc, lane)
            wr = ZERO_F
            if res_slot != 0:
                wr = lds1f(wbase, 4 * num_splits)
            for k in range(CQ):
                o = acc[k]
                if ROTATE:
                    o *= HS
                if res_slot != 0:
                    o += wr * rv[k]
                # a row that saw no token (empty, total 0) gives zeros, as the reference
                out[b, hq, i, lane * CQ + k] = store(o / total if total != ZERO_F else ZERO_F)
            if lane == 0:
                lse[b, hq, i] = m + math.log(total) if total != ZERO_F else neg_inf
            cuda.syncwarp()  # the weights are read before the next row overwrites them

    return finish
