"""Fused quantize of one block of whole key groups: rotate, scale, quantize, pack (keys and values).

Spec sheet
----------
Computes :func:`oscar.reference.block.quantize_block` bit for bit, writing the arrays of
``PackedBlock`` (docs/format.md) for ``T`` tokens of ``k, v [B, H, T, D]``:

    k_codes  uint32 [B, H, T/32, D*kb/32, 32]     k_params [B, H, T/gk, D, 2]   (scale, min)
    v_codes  uint32 [B, H, T, D*vb/32] (tiled)    v_params [B, H, T, D/gv, 2]   (tiled)
    norms    float32 [B, S, T]   (S = 1 for norm_scope "token", H for "head"; untouched without
                                  token scaling)

One launch. Grid ``(T / gk, G, B)``: a block owns one key group (gk tokens) of one batch row, for
all H heads (G = 1) when the token norm spans the heads, else for one head (G = H). Block: D
threads. **A warp lane owns one run of 32 consecutive channels of one token**: ``LPT = D / 32``
adjacent lanes hold a token, a warp ``32 / LPT`` tokens, the block 32 tokens (one sub-tile).

* Load: 16-byte read-only loads of the lane's run (4 for 16-bit inputs, 8 for float32).
* Rotation (FWHT) in registers: stages h = 1..16 inside the run, stages 32..D/2 by butterfly
  shuffles between the token's lanes (``x + o`` on the low lane, ``o - x`` on the high one: the
  reference's ``(a + b, a - b)``), then ``mul.rn`` by 1/sqrt(D). No shared memory, no barrier.
* Token norms (phase 1, with token scaling): per head, the squares' halving tree inside the run
  (registers), then over the token's runs (shuffles) -- exactly the order of
  ``reference/norms.py``; the heads, walked in bit-reversed order, merge on a per-token stack
  (binary counter, ``levels = ceil(log2 H)`` slots) into the head tree. sqrt, 0 / non-finite -> 1.
* Keys (phase 2, per head): u / n (true division) in registers; per-channel min / max over the gk
  tokens through a padded shared tile (thread c reads channel c's column; conflict-free both
  ways), the (scale, min) pair by thread c, then every lane quantizes its own run and packs its
  ``kb`` words in registers (lane = token in the key tile layout). With gk > 32 the sub-tiles are
  recomputed for the codes (the same float32 operations, so the same bits).
* Values: per-token groups inside the run (gv <= 32) or over adjacent lanes (shuffles); codes
  go into the value tile (docs/format.md "Value tiles") by ``atomic or`` of two codes at a time
  in shared memory, then the 32-token tile is written out coalesced.

Exactness: every float32 operation is the reference's, in its order: ``mul.rn`` where a product
feeds an add, true division (``div.rn``), ``rint`` (round half to even, ``cvt.rni``), float16
params by ``cvt.rn.f16.f32``. The cross-lane butterflies multiply by +-1 (exact), so an FMA
contraction there changes nothing; the finite check ``z = x * 0 + z`` only tests for NaN. Min and
max do not depend on order except for the sign of a zero: the kernel stores a zero min as +0.

Errors are reported, not raised (the bridge raises): ``status[0] |= STATUS_NONFINITE`` when a
quantizer input is not finite (any non-finite element of k or v; also finite float32 inputs so
large that the rotation overflows) -- that group gets NaN scale and min and codes 0 (NaN spreads
through the rotation to the whole (head, token) row, and through a non-finite norm the token is
stored unscaled, as in the reference); ``status[0] |= STATUS_FLOAT16_RANGE`` when param_dtype is
float16 and a finite group's min, max or scale exceeds 65504 in magnitude -- NaN params, codes 0;
``status[0] |= STATUS_FLOAT16_UNDERFLOW`` when param_dtype is float16 and a finite group that is
not constant lies entirely below the smallest normal float16 (``max(|min|, |max|) < 2**-14``,
:data:`oscar.reference.quantize.FLOAT16_TINY`: its scale and min would be subnormal or zero) --
NaN params, codes 0. The reference raises ValueError for both float16 cases; every group it
accepts gets the same bits here.

Limits: D in {32, 64, 128, 256}; T a multiple of key_group_size; H <= 65535 and B <= 65535 (grid
y / z); the input rows (the last axis) contiguous, and the input base address and strides
multiples of 16 bytes (the launcher checks; torch tensors from ``.contiguous()`` qualify).
Shared memory: ``(32 (D + D/8) + 2 (D + D/8) + gk (1 + max(1, levels))) * 4`` bytes (< 48 KB).
"""

from __future__ import annotations

import functools
import math

from ..reference.hadamard import hadamard_scale
from ..reference.pack import TILE_TOKENS
from ..reference.quantize import FLOAT16_MAX, FLOAT16_TINY
from ._compat import SIMULATOR, cuda, np
from .kernel_cache import jit, launch
from .common import (LEN_FLUSH, LEN_QUANTIZED, LENGTH_COLUMNS,
                     INPUT_ELEMENT_TYPES, arithmetic_device, device_pointer, fwht_lanes, mul_rn,
                     value_code_location, value_param_location)

if SIMULATOR:  # Python versions with the PTX semantics (ptx_sim.py), for CPU CI
    from . import ptx_sim as _sim
    from .ptx_sim import (f16x2_hi, f16x2_lo, float_as_uint, global_address, ldg4, lds4f,
                          rcp_approx, shared_address, sts4, uint_as_float)

    _sim.install()  # warp shuffles for the simulator's cuda module

    def _rint(y):
        return np.float32(np.rint(np.float32(y)))

    def div_by(a, d, r):
        """The simulator takes the true quotient, which the GPU sequence equals (see there); with
        r = 0 (a zero or NaN scale) the GPU sequence gives a * 0."""
        with np.errstate(all="ignore"):
            if r == 0:
                return np.float32(a) * np.float32(0.0)
            return np.float32(np.float32(a) / np.float32(d))
else:
    from numba.cuda import libdevice

    from .ptx import (f16x2_hi, f16x2_lo, float_as_uint, global_address, ldg4, lds4f,
                      rcp_approx, shared_address, sts4, uint_as_float)

    _rint = libdevice.rintf  # cvt.rni.f32.f32: round half to even

    @cuda.jit(device=True)
    def div_by(a, d, r):
        """``RN(a / d)`` from ``r = RN(1 / d)`` in five FMA-pipe operations, with no slow-path
        call (a ``div.rn`` is a call site; 99 of them made ptxas spill). Markstein's theorem:
        if ``r`` is within half an ulp of 1/d and ``q`` is within one ulp of a/d, then ``q +
        (a - d q) r``, the remainder exact by FMA, rounds to RN(a/d). ``q0 = RN(a r)`` can be
        1.5 ulps off, so one correction makes it faithful and a second one exact. Valid while
        nothing underflows: the caller sends quotients below 2**-90 and numerators below 2**-100
        to :func:`_div_wide`."""
        q = a * r
        q = cuda.fma(cuda.fma(-q, d, a), r, q)
        return cuda.fma(cuda.fma(-q, d, a), r, q)

#: alignment of the shared arrays read with vector loads (the simulator rejects the argument)
ALIGN16 = None if SIMULATOR else 16
#: numerators with |a| >= max(d * 2**-90, 2**-100) take the fast exact division (the quotient and
#: the remainders stay normal); the rest (tiny, zero, NaN) the float64 product (both exact, see
#: ``div_by`` and ``_div_wide``)
_FAST_MIN = np.float32(2.0 ** -90)
_FAST_FLOOR = np.float32(2.0 ** -100)
#: scales below 2**-60 are scaled by 2**64 with their numerators (exact) so that no remainder
#: of the fast division underflows
_SMALL_SCALE = np.float32(2.0 ** -60)
_TWO64 = np.float32(2.0 ** 64)
_F32_NORMAL_MIN = np.float32(2.0 ** -126)
_TWO149 = np.float64(2.0 ** 149)
_TWO_M149 = np.float64(2.0 ** -149)

#: Tokens per packed key tile and per sub-tile of a block (one per lane in the key layout).
TILE = TILE_TOKENS
#: Channels per lane: a lane holds one run of 32 consecutive channels of one token.
RUN = 32
HEAD_DIMS = (32, 64, 128, 256)
PARAM_TYPES = {"float16": "float16", "float32": "float32"}
FULL = 0xFFFFFFFF

#: status[0] bits (the bridge turns them into errors).
STATUS_NONFINITE = 1
STATUS_FLOAT16_RANGE = 2
STATUS_FLOAT16_UNDERFLOW = 4

_F32_INF = np.float32(np.inf)
_F32_NAN = np.float32(np.nan)
_F32_ZERO = np.float32(0.0)
_F32_ONE = np.float32(1.0)
_F16_MAX = np.float32(FLOAT16_MAX)
_F16_TINY = np.float32(FLOAT16_TINY)


def _levels(n: int) -> int:
    """ceil(log2(n)) for n >= 1: the depth of the halving tree over n zero-padded items."""
    return max(0, (n - 1).bit_length())


def threads_per_block(head_dim: int) -> int:
    """Threads of a quantize block: 32 tokens x head_dim / 32 lanes."""
    return head_dim


def tile_stride(head_dim: int) -> int:
    """Row stride (words) of the min / max tile: run r of a row starts at word 36 r, and the stride
    is 4 * LPT mod 32, so the 16-byte stores of 8 lanes hit 8 different bank quads."""
    return head_dim + head_dim // 8


def shared_bytes(head_dim: int, key_group_size: int, levels: int) -> int:
    sp = tile_stride(head_dim)
    return 4 * (TILE * sp + 2 * sp + key_group_size * (1 + max(1, levels)))


@functools.lru_cache(maxsize=None)
def _param_fn(param_dtype: str):
    """Device function: group (min, max, bad, levels) -> (scale_s, min_s, status bits)."""
    f16 = param_dtype == "float16"

    @arithmetic_device
    def group_params(mn, mx, bad, levels):
        if bad:
            return _F32_NAN, _F32_NAN, STATUS_NONFINITE
        # +0 for a zero extreme whatever its sign (x + 0 = +0 for x = -0, else x exactly).
        mn = mn + _F32_ZERO
        mx = mx + _F32_ZERO
        scale = (mx - mn) / levels
        if f16:
            if abs(mn) > _F16_MAX or abs(mx) > _F16_MAX or abs(scale) > _F16_MAX:
                return _F32_NAN, _F32_NAN, STATUS_FLOAT16_RANGE
            if mx > mn and abs(mn) < _F16_TINY and abs(mx) < _F16_TINY:
                return _F32_NAN, _F32_NAN, STATUS_FLOAT16_UNDERFLOW
            return np.float32(np.float16(scale)), np.float32(np.float16(mn)), 0
        return scale, mn, 0

    return group_params


@arithmetic_device
def bit_reverse(j, nbits):
    r = 0
    for _ in range(nbits):
        r = (r << 1) | (j & 1)
        j >>= 1
    return r


@cuda.jit(device=True)
def recip(d):
    """``(RN32(1/d), r64)`` for a positive normal float32 ``d``: a float32 seed and two Newton
    steps in float64 give 1/d to about 2**-52; no float32 quotient is within 2**-48 of a float32
    midpoint (it would need a 25-bit odd significand times d's to be a power of two), so rounding
    r64 to float32 is RN(1/d). No division instruction (no slow-path call)."""
    d64 = np.float64(d)
    r64 = np.float64(rcp_approx(d))
    r64 = r64 + r64 * (1.0 - d64 * r64)
    r64 = r64 + r64 * (1.0 - d64 * r64)
    return np.float32(r64), r64


@cuda.jit(device=True)
def _div_wide(a, r64):
    """``float32(a * r64)``, with ``r64`` 1/d to about 2**-52: ``RN32(a / d)`` wherever that
    is a normal float32 or zero (a / d is never within 2**-48 of a normal float32 rounding
    boundary unless it is exactly representable: a midpoint would need a 25-bit odd significand
    times d's to fit in 24 bits). Below 2**-126 the grid is 2**-149 and a / d can be exactly a
    midpoint, which the float64 product may round the wrong way (a = 147 * 2**-149, d = 98: the
    tie 1.5 * 2**-149 goes to 2 * 2**-149, the product with 1/98 gives 2**-149): a nonzero
    result below 2**-126 must be redone by :func:`_div_subnormal` (:func:`div_exact`)."""
    return np.float32(np.float64(a) * r64)


@cuda.jit(device=True)
def _div_subnormal(a, d, r64):
    """``RN32(a / d)`` for a float32 ``a`` and a positive normal ``d`` where the quotient is
    below 2**-126 in magnitude: y, the float64 quotient in units of 2**-149, is within 2**-27
    of the true one (|y| < 2**23), so the true quotient rounds to k = floor(y) or k + 1, and
    the sign of the exact remainder ``a - (k + 1/2) 2**-149 d`` (k + 1/2 has at most 25
    significant bits, d 24: exact in one float64 FMA) decides; a zero remainder is a tie, which
    goes to the even neighbour as in IEEE division."""
    y = np.float64(a) * r64 * _TWO149
    k = math.floor(y)
    rem = cuda.fma(-((k + 0.5) * _TWO_M149), np.float64(d), np.float64(a))
    if rem > 0.0 or (rem == 0.0 and math.fmod(k, 2.0) != 0.0):
        k = k + 1.0
    return np.float32(math.copysign(abs(k) * _TWO_M149, np.float64(a)))  # -0 for a < 0


@cuda.jit(device=True)
def div_exact(a, d, r, r64, thr):
    """``RN32(a / d)`` for any float32 ``a`` and a positive normal ``d``, from ``(r, r64) =
    recip(d)`` and ``thr = max(d * 2**-90, 2**-100)``: the FMA division where nothing
    underflows, else the float64 product, redone exactly for nonzero quotients below
    2**-126. (The key scaling's per-element path; its common path is ``div_by`` alone.)"""
    if abs(a) >= thr:
        return div_by(a, d, r)
    q = _div_wide(a, r64)  # tiny, zero or NaN
    if q != _F32_ZERO and abs(q) < _F32_NORMAL_MIN:
        q = _div_subnormal(a, d, r64)
    return q


def _build(key_bits, value_bits, key_group_size, value_group_size, head_dim, in_dtype,
           param_dtype, rotate_keys, scale_tokens, rotate_values, head_scope, levels, head_split,
           row_flush=False):
    """Python function of the quantize kernel for one compile-time configuration.

    ``row_flush``: the device-decided flush of a decode step (issue 25). ``k, v`` are the
    residual windows ``[B, H, R, D]`` and the packed arrays the whole capacity; a row's blocks
    exit at once unless ``lengths[b, LEN_FLUSH]`` (its window filled at the last device append),
    and write at token ``lengths[b, LEN_QUANTIZED] - R`` (the append kernel has already counted
    the window as packed). Without it ``lengths`` is not read."""
    ROW_FLUSH = bool(row_flush)
    D = head_dim
    LPT = D // RUN  # lanes per token
    LLPT = LPT.bit_length() - 1
    TPW = 32 // LPT  # tokens per warp
    NSUB = key_group_size // TILE
    SP = tile_stride(D)
    KB, VB = key_bits, value_bits
    KCPW = 32 // KB
    KL = np.float32((1 << KB) - 1)
    VL = np.float32((1 << VB) - 1)
    GV = value_group_size
    VW = D * VB // 32  # value words per token
    VTW = TILE * VW  # words of one value tile
    NT = threads_per_block(D)
    TSZ = TILE * SP  # shared array shapes must be closure constants, not expressions
    KPSZ = 4 * (D + LPT)  # per channel c: (mn_s, kk, sc2, r) at slot c + c // 32
    GK = key_group_size
    LEVELS = levels
    NLEAF = 1 << levels
    NSLOT = max(1, levels)
    ALL_HEADS = scale_tokens and not head_scope  # phase 1 walks every head (token norm)
    ROTK, ROTV, SCALE = bool(rotate_keys), bool(rotate_values), bool(scale_tokens)
    HS = hadamard_scale(D)
    F32_IN = in_dtype == "float32"
    BF16_IN = in_dtype == "bfloat16"
    NLD = 8 if F32_IN else 4  # 16-byte loads per run
    NRAW = 4 * NLD  # uint32 words of a fetched run
    HEAD_SPLIT = bool(head_split)  # one head per block in phase 2, the norms recomputed by each
    NGV = D // GV  # value groups per token
    VGL = max(1, RUN // GV)  # value groups inside a run
    VGS = min(GV, RUN)  # channels of a group inside one run
    VXL = max(1, GV // RUN)  # lanes per value group
    LVXL = VXL.bit_length() - 1
    group_params = _param_fn(param_dtype)
    HI16 = np.uint32(0xFFFF0000)
    S16 = np.uint32(16)

    @cuda.jit(device=True)
    def fetch(arr, b, h, t, lane_run, raw):
        """Issue the 16-byte loads of arr[b, h, t, 32 lane_run : 32 lane_run + 32] into raw
        (uint32); they fly until :func:`convert` uses them (software prefetch)."""
        addr = global_address(arr, (b, h, t, RUN * lane_run))
        for i in range(NLD):
            w0, w1, w2, w3 = ldg4(addr + 16 * i)
            raw[4 * i] = w0
            raw[4 * i + 1] = w1
            raw[4 * i + 2] = w2
            raw[4 * i + 3] = w3

    @cuda.jit(device=True)
    def convert(raw, x):
        """x[0:32] = the float32 values of a fetched run (exact)."""
        for i in range(4 * NLD):
            w = raw[i]
            if F32_IN:
                x[i] = uint_as_float(w)
            elif BF16_IN:
                x[2 * i] = uint_as_float(w << S16)
                x[2 * i + 1] = uint_as_float(w & HI16)
            else:
                x[2 * i] = f16x2_lo(w)
                x[2 * i + 1] = f16x2_hi(w)

    fwht_runs = fwht_lanes(RUN, LPT)

    @cuda.jit(device=True)
    def rotate(x, lane):
        """Normalized FWHT of the token's D channels, held as runs of 32 by LPT adjacent lanes:
        the reference's stages in its order (h = 1..16 in registers, then across lanes)."""
        fwht_runs(x, lane)
        for j in range(RUN):
            x[j] = mul_rn(x[j], HS)

    @cuda.jit(device=True)
    def head_sum(x):
        """The head's sum of squares (reference/norms.py): tree in the run, then across runs
        (overwrites x)."""
        for j in range(RUN):
            x[j] = mul_rn(x[j], x[j])
        for st in range(5):
            p = 16 >> st
            for j in range(p):
                x[j] = x[j] + x[j + p]
        s = x[0]
        for st in range(LLPT):
            s = s + cuda.shfl_xor_sync(FULL, s, LPT >> (st + 1))
        return s

    @cuda.jit(device=True)
    def scale_run(x, n, xs):
        """x[j] = RN(x[j] / n) for the token's norm n (normal, positive)."""
        r, r64 = recip(n)
        thr = max(n * _FAST_MIN, _FAST_FLOOR)
        fast = True  # one test for the run, so that the rare path is a branch: tested per
        for j in range(RUN):  # element, ptxas if-converted it and ran both paths every time
            fast = fast and abs(x[j]) >= thr  # False for NaN
        if fast:
            for j in range(RUN):
                x[j] = div_by(x[j], n, r)
        else:
            # rare (a tiny, zero or NaN element): in the local-memory copy xs, because a loop
            # over x that LLVM does not unroll would index x dynamically and move it to local
            # memory for the whole kernel
            for j in range(RUN):
                xs[j] = x[j]
            for j in range(RUN):
                xs[j] = div_exact(xs[j], n, r, r64, thr)
            for j in range(RUN):
                x[j] = xs[j]

    @cuda.jit(device=True)
    def key_run(raw, x, lane, n, xs):
        """x = the quantizer input of a fetched key run: [FWHT] then [/ n]."""
        convert(raw, x)
        if ROTK:
            rotate(x, lane)
        if SCALE:
            scale_run(x, n, xs)

    @cuda.jit(device=True)
    def quantizer(sc, mn_s):
        """Per-group constants ``(mn_s, kk, sc2, r)`` of :func:`quant`: ``sc2 = sc * kk`` with
        ``kk = 2**64`` for scales below 2**-60 (else 1), ``r = RN(1 / sc2)``; ``r = 0`` for a
        zero or NaN scale, which makes every code 0."""
        kk = _F32_ONE
        if sc > _F32_ZERO and sc < _SMALL_SCALE:
            kk = _TWO64
        sc2 = sc * kk
        r = _F32_ZERO
        if sc > _F32_ZERO:
            r, _ = recip(sc2)
        else:
            sc2 = _F32_ONE
        return mn_s, kk, sc2, r

    @cuda.jit(device=True)
    def quant(x, mn_s, kk, sc2, r, levels):
        """``clamp(rint((x - mn_s) / sc), 0, levels)`` as uint32 (``(x - mn_s) kk / sc2``:
        the same quotient, exact powers of two)."""
        q = _rint(div_by((x - mn_s) * kk, sc2, r))
        q = max(q, _F32_ZERO)  # NaN -> 0
        return np.uint32(min(q, levels))

    def quantize_kernel(k, v, k_codes, k_params, v_codes, v_params, norms, status, lengths):
        kg = cuda.blockIdx.x
        hb = cuda.blockIdx.y
        b = cuda.blockIdx.z
        ob = 0  # first output token (the row's flush position with ROW_FLUSH)
        if ROW_FLUSH:
            if lengths[b, LEN_FLUSH] == 0:  # block-uniform: this row's window did not fill
                return
            ob = lengths[b, LEN_QUANTIZED] - k.shape[2]
        tid = cuda.threadIdx.x
        lane = tid & 31
        lr = lane & (LPT - 1)  # this lane's run of its token
        tk = (tid >> 5) * TPW + (lane >> LLPT)  # its token in the sub-tile
        num_heads = k.shape[1]
        g0 = kg * GK  # first token of the key group
        tile = cuda.shared.array(TSZ, np.uint32, alignment=ALIGN16)  # min / max, then values
        kpar = cuda.shared.array(KPSZ, np.float32, alignment=ALIGN16)  # quantizer per channel
        nrm = cuda.shared.array(GK, np.float32)
        stk = cuda.shared.array((NSLOT, GK), np.float32)
        tile_b = shared_address(tile, 0)
        kpar_b = shared_address(kpar, 0)
        x = cuda.local.array(RUN, np.float32)
        cd = cuda.local.array(RUN, np.uint32)
        xs = cuda.local.array(RUN, np.float32)  # the rare path's copy of x (local memory)
        rk = cuda.local.array(NRAW, np.uint32)  # fetched key run
        rv = cuda.local.array(NRAW, np.uint32)  # fetched value run (or the next leaf's keys)
        flags = 0
        col = tid + 4 * (tid >> 5)  # thread c's column in the padded tile (c = tid)
        run0 = (RUN + 4) * lr  # this lane's run in a padded row
        kp0 = 16 * (RUN + 1) * lr  # byte offset of its run's channels in kpar

        # ---- phase 1: token norms (the heads in bit-reversed order merge on a per-token stack)
        if SCALE:
            if NSUB == 1:
                fetch(k, b, hb if not ALL_HEADS else 0, g0 + tk, lr, rv)
            for j in range(NLEAF):
                head = hb if not ALL_HEADS else bit_reverse(j, LEVELS)
                present = head < num_heads  # uniform over the block
                for sub in range(NSUB):
                    tt = sub * TILE + tk
                    carry = _F32_ZERO  # a padding head adds +0, as the reference pads
                    if present:
                        if NSUB == 1:  # the next present leaf's keys fly during this one
                            for i in range(NRAW):
                                rk[i] = rv[i]
                            nj = j + 1  # the next leaf that is a real head
                            while nj < NLEAF and bit_reverse(nj, LEVELS) >= num_heads:
                                nj += 1
                            if ALL_HEADS and nj < NLEAF:
                                fetch(k, b, bit_reverse(nj, LEVELS), g0 + tt, lr, rv)
                        else:
                            fetch(k, b, head, g0 + tt, lr, rk)
                        convert(rk, x)
                        if ROTK:
                            rotate(x, lane)
                        carry = head_sum(x)
                    if lr == 0:
                        level = 0
                        jj = j
                        while jj & 1:
                            carry = stk[level, tt] + carry
                            level += 1
                            jj >>= 1
                        if level < LEVELS:
                            stk[level, tt] = carry
                        else:  # the last leaf: the token's sum of squares
                            n = np.float32(math.sqrt(carry))
                            if not (math.isfinite(n) and n != _F32_ZERO):
                                n = _F32_ONE
                            nrm[tt] = n
                            if hb == 0 or not HEAD_SPLIT:
                                norms[b, 0 if HEAD_SPLIT else hb, ob + g0 + tt] = n
            cuda.syncthreads()

        h_first = 0 if ALL_HEADS and not HEAD_SPLIT else hb
        h_end = num_heads if ALL_HEADS and not HEAD_SPLIT else hb + 1
        for head in range(h_first, h_end):
            fetch(k, b, head, g0 + tk, lr, rk)  # sub-tile 0 of keys and values: both in flight
            fetch(v, b, head, g0 + tk, lr, rv)
            # ---- keys, pass A: u = [H] k [/ n]; per-channel min / max over the key group
            cmn = _F32_INF
            cmx = -_F32_INF
            cz = _F32_ZERO
            for sub in range(NSUB):
                tt = sub * TILE + tk
                if sub > 0:
                    fetch(k, b, head, g0 + tt, lr, rk)
                key_run(rk, x, lane, nrm[tt], xs)
                for i in range(RUN // 4):
                    sts4(tile_b, 4 * (tk * SP + run0 + 4 * i), float_as_uint(x[4 * i]),
                         float_as_uint(x[4 * i + 1]), float_as_uint(x[4 * i + 2]),
                         float_as_uint(x[4 * i + 3]))
                cuda.syncthreads()
                for t in range(TILE):
                    u = uint_as_float(tile[t * SP + col])
                    cmn = min(cmn, u)
                    cmx = max(cmx, u)
                    cz = u * _F32_ZERO + cz  # NaN once any input is not finite
                cuda.syncthreads()
            sc, mn_s, fl = group_params(cmn, cmx, cz != cz, KL)
            flags |= fl
            k_params[b, head, ob // GK + kg, tid, 0] = sc
            k_params[b, head, ob // GK + kg, tid, 1] = mn_s
            qa, qb, qc, qd = quantizer(sc, mn_s)
            sts4(kpar_b, 16 * (tid + (tid >> 5)), float_as_uint(qa), float_as_uint(qb),
                 float_as_uint(qc), float_as_uint(qd))
            cuda.syncthreads()
            # ---- keys, pass B: each lane quantizes its run and packs its words (lane = token)
            for sub in range(NSUB):
                tt = sub * TILE + tk
                if NSUB > 1:  # recompute the sub-tile: the same operations give the same bits
                    fetch(k, b, head, g0 + tt, lr, rk)
                    key_run(rk, x, lane, nrm[tt], xs)
                for w in range(KB):
                    word = np.uint32(0)
                    for i in range(KCPW):
                        j = w * KCPW + i
                        qa, qb, qc, qd = lds4f(kpar_b, kp0 + 16 * j)
                        word |= quant(x[j], qa, qb, qc, qd, KL) << np.uint32(KB * i)
                    k_codes[b, head, ob // TILE + kg * NSUB + sub, lr * KB + w, tk] = word
            # ---- values: per-token groups, packed into the value tile in shared memory
            for i in range(tid, VTW, NT):
                tile[i] = np.uint32(0)
            for sub in range(NSUB):
                tt = sub * TILE + tk
                if sub > 0:
                    fetch(v, b, head, g0 + tt, lr, rv)
                convert(rv, x)
                if ROTV:
                    rotate(x, lane)
                for gl in range(VGL):
                    mn = _F32_INF
                    mx = -_F32_INF
                    z = _F32_ZERO
                    for j in range(VGS):
                        u = x[gl * VGS + j]
                        mn = min(mn, u)
                        mx = max(mx, u)
                        z = u * _F32_ZERO + z
                    for st in range(LVXL):  # groups over several lanes
                        m = 1 << st
                        mn = min(mn, cuda.shfl_xor_sync(FULL, mn, m))
                        mx = max(mx, cuda.shfl_xor_sync(FULL, mx, m))
                        z = z + cuda.shfl_xor_sync(FULL, z, m)
                    sc, mn_s, fl = group_params(mn, mx, z != z, VL)
                    if (lr & (VXL - 1)) == 0:
                        flags |= fl
                        gi = (RUN * lr + gl * VGS) // GV
                        # the tiled order (docs/format.md 2c); a min sits 16 NGV elements, i.e.
                        # 8 rows, after its scale. (Staging a tile's params in shared memory
                        # for coalesced stores was slower: 198 against 185 us for 32K tokens)
                        pr, pg, pp = value_param_location(tk, gi, 0, NGV)
                        pr += ob + g0 + sub * TILE
                        v_params[b, head, pr, pg, pp] = sc
                        v_params[b, head, pr + 8, pg, pp] = mn_s
                    qa, qb, qc, qd = quantizer(sc, mn_s)
                    for j in range(VGS):
                        cd[gl * VGS + j] = quant(x[gl * VGS + j], qa, qb, qc, qd, VL)
                cuda.syncthreads()  # the tile is zeroed (and free of the key pass) everywhere
                # channels j and j + 16 of the run are chunks 2 lr and 2 lr + 1: adjacent slots of
                # one word (docs/format.md "Value tiles")
                for j in range(16):
                    wd, shift = value_code_location(tk, RUN * lr + j, D, VB)
                    cuda.atomic.or_(tile, wd, (cd[j] | (cd[j + 16] << np.uint32(VB)))
                                    << np.uint32(shift))
                cuda.syncthreads()
                t0 = ob + g0 + sub * TILE
                for i in range(tid, VTW, NT):
                    v_codes[b, head, t0 + i // VW, i % VW] = tile[i]
                    tile[i] = np.uint32(0)
                cuda.syncthreads()

        if flags != 0:
            cuda.atomic.or_(status, 0, flags)

    return quantize_kernel


@functools.lru_cache(maxsize=None)
def _quantize_source(key_bits, value_bits, key_group_size, value_group_size, head_dim, in_dtype,
                     param_dtype, rotate_keys, scale_tokens, rotate_values, head_scope, levels,
                     head_split, row_flush=False):
    """(kernel function, signature) of the quantize kernel for one configuration."""
    fn = _build(key_bits, value_bits, key_group_size, value_group_size, head_dim, in_dtype,
                param_dtype, rotate_keys, scale_tokens, rotate_values, head_scope, levels,
                head_split, row_flush)
    it = INPUT_ELEMENT_TYPES[in_dtype]
    pt = PARAM_TYPES[param_dtype]
    sig = (f"void({it}[:, :, :, :], {it}[:, :, :, :], uint32[:, :, :, :, :], {pt}[:, :, :, :, :], "
           f"uint32[:, :, :, :], {pt}[:, :, :, :, :], float32[:, :, :], int32[:], "
           "int32[:, ::1])")
    return fn, sig


#: Below this many (key group, batch) blocks, a token-norm launch gives each head its own block
#: (the norms are recomputed per block): a 128-token flush has 4 groups, so 4 blocks would walk
#: 8 heads each. About one block per SM of an H200.
HEAD_SPLIT_BELOW = 128


def _quantize_key(config, head_dim: int, in_dtype: str, num_kv_heads: int,
                  blocks: int = HEAD_SPLIT_BELOW, row_flush: bool = False) -> tuple:
    """The factory key of a configuration (flags that do not change the code are normalized);
    ``blocks`` = key groups x batch of the launch; ``row_flush``: the device-decided flush."""
    head_scope = config.scale_tokens and config.norm_scope == "head"
    all_heads = config.scale_tokens and not head_scope
    levels = _levels(num_kv_heads) if all_heads else 0
    head_split = all_heads and num_kv_heads > 1 and blocks < HEAD_SPLIT_BELOW
    return (config.key_bits, config.value_bits, config.key_group_size, config.value_group_size,
            head_dim, in_dtype, config.param_dtype, config.rotate_keys, config.scale_tokens,
            config.rotate_values, head_scope, levels, head_split) + ((True,) if row_flush else ())


#: Register cap of the quantize kernel: 4 blocks (16 warps) per SM. Uncapped ptxas takes about 220
#: and the 32K prefill ran 211 us against 184 us at 128 and 200 us at 96 (H200, 2026-11-24).
MAX_REGISTERS = 128


@functools.lru_cache(maxsize=None)
def _quantize_kernel(key: tuple):
    fn, sig = _quantize_source(*key)
    opts = {} if SIMULATOR else {"max_registers": MAX_REGISTERS}  # the simulator takes no cap
    return jit(fn, sig, name="quantize", key=key, **opts)


# --- launch wrapper -------------------------------------------------------------------------------


def _expect(name: str, arr, shape: tuple, dtype) -> None:
    if tuple(arr.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(arr.shape)}")
    if np.dtype(arr.dtype) != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, "
                        f"got {np.dtype(arr.dtype).name}")


def check_block_arrays(k, v, k_codes, k_params, v_codes, v_params, norms, config, in_dtype,
                       k_name="k", v_name="v"):
    """Validate the shapes and dtypes of a packed block against ``k [B, H, T, D]`` and ``config``.

    Returns ``(B, H, T, D)``. Raises ValueError / TypeError naming the argument.
    """
    if in_dtype not in INPUT_ELEMENT_TYPES:
        raise ValueError(f"in_dtype: expected one of {tuple(INPUT_ELEMENT_TYPES)}, "
                         f"got {in_dtype!r}")
    if len(k.shape) != 4:
        raise ValueError(f"{k_name}: expected a 4-D array [batch, num_kv_heads, seq_len, "
                         f"head_dim], got shape {tuple(k.shape)}")
    bsz, heads, seq, d = (int(x) for x in k.shape)
    elem = np.int16 if in_dtype == "bfloat16" else np.dtype(in_dtype)
    _expect(k_name, k, (bsz, heads, seq, d), elem)
    _expect(v_name, v, (bsz, heads, seq, d), elem)
    if d not in HEAD_DIMS:
        raise ValueError(f"{k_name}: expected head_dim in {HEAD_DIMS}, got {d}")
    config.check_head_dim(d, f"head_dim of {k_name}")
    if seq % config.key_group_size:
        raise ValueError(f"{k_name}: expected seq_len a multiple of key_group_size "
                         f"({config.key_group_size}), got {seq}")
    pd = np.float16 if config.param_dtype == "float16" else np.float32
    _expect("k_codes", k_codes, (bsz, heads, seq // TILE, d * config.key_bits // 32, TILE),
            np.uint32)
    _expect("k_params", k_params, (bsz, heads, seq // config.key_group_size, d, 2), pd)
    _expect("v_codes", v_codes, (bsz, heads, seq, d * config.value_bits // 32), np.uint32)
    _expect("v_params", v_params, (bsz, heads, seq, d // config.value_group_size, 2), pd)
    if config.scale_tokens:
        s = 1 if config.norm_scope == "token" else heads
        _expect("norms", norms, (bsz, s, seq), np.float32)
    elif len(norms.shape) != 3 or np.dtype(norms.dtype) != np.float32:
        raise ValueError(f"norms: expected a float32 [1, 1, 1] placeholder without token scaling, "
                         f"got {np.dtype(norms.dtype).name} {tuple(norms.shape)}")
    return bsz, heads, seq, d


def _check_input_layout(name: str, arr) -> None:
    """The kernel reads 16-byte vectors of each input row: rows contiguous, base and strides
    multiples of 16 bytes."""
    item = np.dtype(arr.dtype).itemsize
    strides = tuple(int(s) for s in arr.strides)
    ptr = device_pointer(arr)
    if strides[3] != item or any(s % 16 for s in strides[:3]) or ptr % 16:
        raise ValueError(f"{name}: expected rows contiguous along head_dim with a 16-byte aligned "
                         f"base and strides (e.g. a .contiguous() tensor), got strides "
                         f"{strides} bytes and base address {ptr:#x}")


def quantize_block(k, v, k_codes, k_params, v_codes, v_params, norms, status, config, in_dtype,
                   stream=0) -> None:
    """Quantize and pack ``k, v [batch, num_kv_heads, seq_len, head_dim]`` into the given arrays.

    Equals :func:`oscar.reference.block.quantize_block` on ``float32(k), float32(v)`` bit for bit
    (see the module spec sheet for the error groups). ``status`` (int32[1], device) is OR-ed with
    ``STATUS_NONFINITE`` / ``STATUS_FLOAT16_RANGE`` / ``STATUS_FLOAT16_UNDERFLOW``; it is not
    cleared here.
    """
    bsz, heads, seq, d = check_block_arrays(k, v, k_codes, k_params, v_codes, v_params, norms,
                                            config, in_dtype)
    if tuple(status.shape) != (1,) or np.dtype(status.dtype) != np.int32:
        raise ValueError(f"status: expected an int32 array of shape (1,), got "
                         f"{np.dtype(status.dtype).name} {tuple(status.shape)}")
    if seq == 0 or bsz == 0 or heads == 0:
        return
    _check_input_layout("k", k)
    _check_input_layout("v", v)
    kernel, grid, block, args = quantize_launch(k, v, k_codes, k_params, v_codes, v_params, norms,
                                                status, config, in_dtype)
    launch(kernel, grid, block, stream, *args)


def quantize_kernels(config, head_dim: int, in_dtype: str, num_kv_heads: int, batch: int,
                     prefill: bool = True) -> list:
    """Compile (or load from the kernel cache) the quantize kernels a cache of this shape uses:
    the flush of one residual window at this batch size and, with ``prefill``, both variants a
    prompt can take (heads split across blocks or not: :func:`_quantize_key`). For warm-up."""
    groups = config.residual_length // config.key_group_size
    keys = {_quantize_key(config, head_dim, in_dtype, num_kv_heads, groups * batch)}
    if prefill:
        keys |= {_quantize_key(config, head_dim, in_dtype, num_kv_heads, blocks)
                 for blocks in (1, HEAD_SPLIT_BELOW)}
    return [_quantize_kernel(key) for key in sorted(keys)]


#: Parameter names of the quantize kernel, in order (:func:`quantize_launch`).
QUANTIZE_ARGS = ("k", "v", "k_codes", "k_params", "v_codes", "v_params", "norms", "status",
                 "lengths")


def quantize_launch(k, v, k_codes, k_params, v_codes, v_params, norms, status, config, in_dtype,
                    lengths=None):
    """The launch of :func:`quantize_block` on validated arrays (seq_len > 0):
    ``(kernel, grid, block, args)``, args in :data:`QUANTIZE_ARGS` order.

    With ``lengths`` (int32 ``[batch, 4]``, device): the row-flush variant (``_build``'s
    ``row_flush``): ``k, v`` the residual windows, the packed arrays the whole capacity, each
    row written at its own flush position or not at all. Without: a dummy lengths argument."""
    bsz, heads, seq, d = (int(x) for x in k.shape)
    groups = seq // config.key_group_size
    key = _quantize_key(config, d, in_dtype, heads, groups * bsz, row_flush=lengths is not None)
    all_heads = config.scale_tokens and not key[10]
    grid_y = heads if key[12] or not all_heads else 1
    kernel = _quantize_kernel(key)
    if lengths is None:
        lengths = _no_lengths()
    return (kernel, (groups, grid_y, bsz), threads_per_block(d),
            (k, v, k_codes, k_params, v_codes, v_params, norms, status, lengths))


@functools.lru_cache(maxsize=None)
def _no_lengths_for(device_id):
    return cuda.to_device(np.zeros((1, LENGTH_COLUMNS), np.int32))


def _no_lengths():
    """A [1, 4] int32 device array for launches that do not read ``lengths`` (one per device)."""
    dev = 0 if SIMULATOR else cuda.get_current_device().id
    return _no_lengths_for(dev)


# --- compile registry -----------------------------------------------------------------------------


def _representative_configs():
    """Configurations that together take every branch of the factory (compile checks)."""
    from oscar.config import OScaRConfig

    yield OScaRConfig(), 128, "bfloat16", 8
    yield (OScaRConfig(key_bits=4, value_bits=8, value_group_size=64, param_dtype="float32"), 64,
           "float16", 5)
    yield OScaRConfig(key_bits=8, value_bits=4, key_group_size=64, norm_scope="head"), 256, \
        "float32", 2
    yield OScaRConfig(key_group_size=128, value_group_size=32, rotate_keys=False,
                      rotate_values=False, scale_tokens=False, residual_length=128), 32, \
        "float16", 1
    yield OScaRConfig(key_bits=2, value_bits=8, value_group_size=4, scale_tokens=False), 256, \
        "bfloat16", 3


def compile_signatures():
    """(name, python function, signature) of a representative set of kernels for compile checks."""
    for i, (cfg, d, in_dtype, heads) in enumerate(_representative_configs()):
        for blocks in ((HEAD_SPLIT_BELOW, 1) if i == 0 else (HEAD_SPLIT_BELOW,)):
            key = _quantize_key(cfg, d, in_dtype, heads, blocks)
            fn, sig = _quantize_source(*key)
            yield f"quantize.quantize{key}", fn, sig
        if i == 0:  # the device-decided flush (row_flush) of a decode step
            key = _quantize_key(cfg, d, in_dtype, heads, 8, row_flush=True)
            fn, sig = _quantize_source(*key)
            yield f"quantize.quantize{key}", fn, sig
