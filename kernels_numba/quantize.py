"""Fused quantize of one block of whole key groups: rotate, scale, quantize, pack (keys and values).

Spec sheet
----------
Computes :func:`oscar.reference.block.quantize_block` bit for bit, writing the arrays of
``PackedBlock`` (docs/format.md) for ``T`` tokens of ``k, v [B, H, T, D]``:

    k_codes  uint32 [B, H, T/32, D*kb/32, 32]     k_params [B, H, T/gk, D, 2]   (scale, min)
    v_codes  uint32 [B, H, T, D*vb/32] (tiled)    v_params [B, H, T, D/gv, 2]
    norms    float32 [B, S, T]   (S = 1 for norm_scope "token", H for "head"; untouched without
                                  token scaling)

Two kernels, launched back to back on the caller's stream:

1. ``norm_kernel`` (only with ``scale_tokens``): the safe token norms of the rotated keys.
   Grid ``(T / TT, S, B)``, ``THREADS`` threads. A block owns ``TT`` tokens of one batch row
   (and one head for scope "head"); ``TT`` is the largest power of two <= 32 whose buffers fit
   ``NORM_SMEM_BUDGET`` (32 for D = 32, 16 for D = 128 and 8 heads, 8 for D = 256 and 8 heads).
   It walks the heads in bit-reversed order: load ``[TT, D]`` (thread p <-> elements p, p + 256,
   ... row-major, coalesced), FWHT in shared memory, ``u = mul.rn(y, 1/sqrt(D))``, ``s = mul.rn(u,
   u)``. The reference sums the squares of a token over the flattened (head, channel) index by a
   halving tree (reference/norms.py); with D a power of two that tree first adds head ``h`` to head
   ``h + Hp/2`` channel by channel, i.e. it is the adjacent-pair tree over the heads taken in
   bit-reversed order. Each thread keeps its elements' pending partial sums on a small stack in
   shared memory (one slot per tree level; binary-counter merge), so the head sums cost
   ``log2(Hp) * TT * D`` floats whatever H is; zero padding heads add ``+0`` exactly as the
   reference's padding does. Then the halving tree over the D channels in shared memory, a
   correctly rounded sqrt, and 0 / non-finite -> 1.
   Shared memory: ``(1 + max(1, log2 Hp)) * TT * D * 4`` bytes <= 40 KB.

2. ``quantize_kernel``: grid ``(T / gk, H, B)``, ``THREADS`` threads; a block owns one key group
   (gk tokens) of one (batch, head), for keys and values, processed in 32-token sub-tiles held in a
   ``[32, D + 1]`` float32 shared tile (the +1 pad makes the lane = token reads of packing
   conflict-free).
   Keys: load, FWHT, ``mul.rn`` by the scale, true division by the norm (read from ``norms``);
   threads (c = tid % D, r = tid // D) take partial min / max of channel c over tokens r, r + 256/D,
   ...; partials combine through shared memory into running per-channel min / max. With gk > 32
   the group's sub-tiles are re-read and re-rotated for packing (the same float32 operations, so the
   same bits; the re-read mostly hits L2). Params: thread c. Packing: thread p <-> (lane = p % 32,
   word = p // 32) builds word ``w`` of token ``lane`` and writes ``k_codes[b, h, tile, w, lane]``:
   a warp writes 128 contiguous bytes.
   Values: per 32-token sub-tile, load (+ FWHT and scale); R = min(words per group, 256 / groups)
   threads share a group (t, g), each owning whole words: partial min / max of their words, combine
   through shared memory, params (thread r == 0 stores them), then each thread quantizes its words'
   channels in place in the shared tile (codes as float32). After a barrier, thread p builds word
   p of the sub-tile's value run (docs/format.md "Value tiles": a word holds one channel set of
   two tokens) from the codes in the tile and writes it (coalesced).
   Shared memory: ``32 * (D + 1) * 4 + 3 * max(THREADS, D) * 4 + 5 * D * 4`` bytes (41 KB at
   D = 256).

Exactness: every float32 operation is the reference's, in its order. Products that feed an add
use ``mul_rn`` (no FMA contraction); divisions are ``div.rn`` (numba-cuda default without
fastmath); the float16 params are ``cvt.rn.f16.f32``. Min and max do not depend on order except
for the sign of a zero: the kernel stores a zero min as +0 (NumPy's sign there depends on its
SIMD reduction order; see tests).

Errors are reported, not raised (the bridge raises): ``status[0] |= STATUS_NONFINITE`` when a
quantizer input is not finite (any non-finite element of k or v; also finite float32 inputs so
large that the rotation overflows) -- that group gets NaN scale and min and codes 0 (NaN spreads
through the rotation to the whole (head, token) row, and through a non-finite norm the token is
stored unscaled, as in the reference); ``status[0] |= STATUS_FLOAT16_RANGE`` when param_dtype is
float16 and a finite group's min, max or scale exceeds 65504 in magnitude -- NaN params, codes 0.

Threads: ``THREADS`` (256) by default; any power of two from 32 to 1024 through ``threads=``
(every loop is strided by the block size; the simulator tests use 32).

Limits: T a multiple of key_group_size; D in {32, 64, 128, 256}; H <= 65535 and B <= 65535
(grid y / z); T / 32 < 2**31.

Performance notes (not measured yet): DRAM traffic with token scaling is K twice (norm kernel,
then quantize kernel; the second read hits L2 when the call's keys fit in the 50 MB L2 -- a
128-token flush does, a 32K-token prefill of bf16 Llama-3.1-8B keys (64 MB per batch row) does
not, so the caller may split a long prefill into chunks of whole key groups), V once, the packed
arrays once. Likely hot spots for the tuning pass: ``fwht_shared``'s pair index uses run-time
int64 ``//`` and ``%`` by powers of two (shifts and masks would do), one ``div.rn.f32`` and one
``rint`` per element (required for exactness), about 25 barriers per quantize block, and the
serial scan of a value group by few threads when value groups are large.
"""

from __future__ import annotations

import functools
import math

from ..reference.hadamard import hadamard_scale
from ..reference.pack import TILE_TOKENS
from ..reference.quantize import FLOAT16_MAX
from ._compat import cuda, np
from .common import (INPUT_ELEMENT_TYPES, arithmetic_device, check_threads, float32_loader,
                     fwht_shared, mul_rn, plain_in_simulator, rint_half_even)

#: Threads per block: 8 warps. THREADS >= head_dim lets thread c own channel c of the keys.
THREADS = 256
#: Tokens per packed key tile: one warp lane per token (the packed layout's tile).
TILE = TILE_TOKENS
#: Shared-memory budget of the norm kernel: under the 48 KB of static shared memory a default
#: launch allows, leaving room for several blocks per SM.
NORM_SMEM_BUDGET = 40 * 1024
#: Elements of one norm tile: 16 KB of float32 keeps a block busy without more smem.
NORM_TILE_ELEMENTS = 4096
HEAD_DIMS = (32, 64, 128, 256)
PARAM_TYPES = {"float16": "float16", "float32": "float32"}

#: status[0] bits (the bridge turns them into errors).
STATUS_NONFINITE = 1
STATUS_FLOAT16_RANGE = 2

_F32_INF = np.float32(np.inf)
_F32_NAN = np.float32(np.nan)
_F32_ZERO = np.float32(0.0)
_F32_ONE = np.float32(1.0)
_F16_MAX = np.float32(FLOAT16_MAX)


def _levels(n: int) -> int:
    """ceil(log2(n)) for n >= 1: the depth of the halving tree over n zero-padded items."""
    return max(0, (n - 1).bit_length())


def norm_tile_tokens(head_dim: int, levels: int) -> int:
    """Tokens per norm-kernel block (a power of two <= 32, so it divides every T)."""
    per_token = (1 + max(1, levels)) * head_dim * 4
    tt = TILE
    while tt > 1 and (tt * per_token > NORM_SMEM_BUDGET or tt * head_dim > NORM_TILE_ELEMENTS):
        tt //= 2
    return tt


# --- device-function builders shared by the two kernels -----------------------------------------


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
            return np.float32(np.float16(scale)), np.float32(np.float16(mn)), 0
        return scale, mn, 0

    return group_params


_rint_half_even = plain_in_simulator(rint_half_even)


@arithmetic_device
def quant_code(x, mn_s, scale_s, levels):
    """``clamp(rint((x - mn_s) / scale_s), 0, levels)`` as an int; 0 for a zero or NaN scale."""
    if not scale_s > _F32_ZERO:  # constant group (0), or a poisoned group (NaN)
        return 0
    r = _rint_half_even((x - mn_s) / scale_s)
    if not r >= _F32_ZERO:
        return 0
    if r > levels:
        r = levels
    return int(r)


@arithmetic_device
def bit_reverse(j, nbits):
    r = 0
    for _ in range(nbits):
        r = (r << 1) | (j & 1)
        j >>= 1
    return r


@arithmetic_device
def minmax_update(x, mn, mx, bad):
    """Fold one element into a running (min, max, any-non-finite)."""
    if math.isfinite(x):
        if x < mn:
            mn = x
        if x > mx:
            mx = x
    else:
        bad = 1
    return mn, mx, bad


@functools.lru_cache(maxsize=None)
def _tile_loader(head_dim: int, in_dtype: str, rotate: bool, scale_tokens: bool, rows: int,
                 threads: int):
    """Device function filling ``tile[0:rows, 0:D]`` with the quantizer input of tokens
    ``t0 .. t0 + rows`` of ``x[b, h]``: load, [FWHT, mul.rn by 1/sqrt(D)], [/ norms[b, s, t]].
    All threads call it; it ends with a barrier."""
    d = head_dim
    nt = threads
    hs = hadamard_scale(d)
    load = float32_loader(in_dtype)

    @cuda.jit(device=True)
    def load_tile(x, norms, b, h, s, t0, tile, tid):
        p = tid
        while p < rows * d:
            t = p // d
            c = p - t * d
            u = load(x[b, h, t0 + t, c])
            if scale_tokens and not rotate:
                u = u / norms[b, s, t0 + t]
            tile[t, c] = u
            p += nt
        if rotate:
            fwht_shared(tile, rows, d, tid, nt)
            p = tid
            while p < rows * d:
                t = p // d
                c = p - t * d
                u = mul_rn(tile[t, c], hs)
                if scale_tokens:
                    u = u / norms[b, s, t0 + t]
                tile[t, c] = u
                p += nt
        cuda.syncthreads()

    return load_tile


# --- kernel 1: safe token norms -------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _norm_source(head_dim: int, in_dtype: str, rotate: bool, levels: int, head_scope: bool,
                 threads: int):
    """(kernel function, signature) of the norm kernel. ``levels`` = ceil(log2 H) (0 for scope
    "head", where a block sums one head)."""
    d = head_dim
    nt = threads
    tt = norm_tile_tokens(d, levels)
    n_leaves = 1 << levels
    stack_slots = max(1, levels)
    hs = hadamard_scale(d)
    load = float32_loader(in_dtype)

    def norm_kernel(k, norms):
        t0 = cuda.blockIdx.x * tt
        s = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        num_heads = k.shape[1]
        buf = cuda.shared.array((tt, d), np.float32)
        stack = cuda.shared.array((stack_slots, tt, d), np.float32)
        for j in range(n_leaves):
            head = s if head_scope else bit_reverse(j, levels)
            present = head < num_heads  # uniform over the block: barriers below are safe
            if present:
                p = tid
                while p < tt * d:
                    t = p // d
                    c = p - t * d
                    buf[t, c] = load(k[b, head, t0 + t, c])
                    p += nt
                if rotate:
                    fwht_shared(buf, tt, d, tid, nt)
            # Each thread merges only its own elements (same p mapping as the load): no barrier.
            p = tid
            while p < tt * d:
                t = p // d
                c = p - t * d
                carry = _F32_ZERO  # a padding head: +0, as the reference pads
                if present:
                    u = buf[t, c]
                    if rotate:
                        u = mul_rn(u, hs)
                    carry = mul_rn(u, u)
                level = 0
                jj = j
                while jj & 1:
                    carry = stack[level, t, c] + carry
                    level += 1
                    jj >>= 1
                if level < levels:
                    stack[level, t, c] = carry
                else:  # j == n_leaves - 1: the head sum of (t, c); the channel tree follows
                    buf[t, c] = carry
                p += nt
            cuda.syncthreads()
        half = d // 2
        while half >= 1:
            p = tid
            while p < tt * half:
                t = p // half
                c = p - t * half
                buf[t, c] = buf[t, c] + buf[t, c + half]
                p += nt
            cuda.syncthreads()
            half //= 2
        if tid < tt:
            n = np.float32(math.sqrt(buf[tid, 0]))
            if not (math.isfinite(n) and n != _F32_ZERO):
                n = _F32_ONE
            norms[b, s, t0 + tid] = n

    sig = f"void({INPUT_ELEMENT_TYPES[in_dtype]}[:, :, :, :], float32[:, :, :])"
    return norm_kernel, sig


# --- kernel 2: quantize and pack ------------------------------------------------------------------


def _value_tile_inverse(head_dim, value_bits):
    """Device function ``(word, j) -> (token, channel)``: which code of a 32-token value tile is
    code ``j`` of word ``word`` of the tile (the inverse of ``common.value_code_location``).

    With ``slot = word * hc + j % hc`` (``hc = 16 / bits`` codes per 16-bit half) and ``half = j
    // hc``, the slot's fields give token ``16 kb + 8 pair + 4 half + t4`` and channel ``16 chunk +
    8 hi + g`` (docs/format.md, "Value tiles")."""
    hc = 16 // value_bits
    nch = head_dim // 16

    def code_at(word, j):
        slot = word * hc + j % hc
        chunk = slot % nch
        rest = slot // nch
        hi = rest & 1
        pair = (rest >> 1) & 1
        t4 = (rest >> 2) & 3
        g = (rest >> 4) & 7
        kb = rest >> 7
        return 16 * kb + 8 * pair + 4 * (j // hc) + t4, 16 * chunk + 8 * hi + g

    return arithmetic_device(code_at)


@functools.lru_cache(maxsize=None)
def _quantize_source(key_bits, value_bits, key_group_size, value_group_size, head_dim, in_dtype,
                     param_dtype, rotate_keys, scale_tokens, rotate_values, head_scope, threads):
    """(kernel function, signature) of the quantize kernel for one configuration."""
    d = head_dim
    nt = threads
    n_sub = key_group_size // TILE
    d_pad = d + 1  # row stride of the shared tile: lane-major reads hit 32 different banks
    # keys
    k_cpw = 32 // key_bits
    k_words = d // k_cpw
    k_levels = np.float32((1 << key_bits) - 1)
    k_parts = max(1, nt // d)  # threads per channel in the min/max scan
    c_step = min(nt, d)  # channel stride of a thread (one channel per thread when nt >= d)
    red_size = max(nt, d)
    # values
    v_cpw = 32 // value_bits
    v_levels = np.float32((1 << value_bits) - 1)
    v_groups_per_token = d // value_group_size
    v_words_per_group = value_group_size // v_cpw
    v_groups = TILE * v_groups_per_token
    v_parts = min(v_words_per_group, max(1, nt // v_groups))  # threads per value group
    v_words = d * value_bits // 32  # words per token row of v_codes
    v_tile_words = TILE * v_words
    v_code_at = _value_tile_inverse(d, value_bits)
    v_groups_per_pass = nt // v_parts

    group_params = _param_fn(param_dtype)
    load_keys = _tile_loader(d, in_dtype, rotate_keys, scale_tokens, TILE, nt)
    load_values = _tile_loader(d, in_dtype, rotate_values, False, TILE, nt)

    def quantize_kernel(k, v, k_codes, k_params, v_codes, v_params, norms, status):
        kg = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        s = h if head_scope else 0
        tile = cuda.shared.array((TILE, d_pad), np.float32)
        red_mn = cuda.shared.array(red_size, np.float32)
        red_mx = cuda.shared.array(red_size, np.float32)
        red_bad = cuda.shared.array(red_size, np.int32)
        k_mn = cuda.shared.array(d, np.float32)
        k_mx = cuda.shared.array(d, np.float32)
        k_bad = cuda.shared.array(d, np.int32)
        k_scale = cuda.shared.array(d, np.float32)
        k_min = cuda.shared.array(d, np.float32)
        flags = 0

        # ---- keys, pass 1: per-channel min / max over the group's sub-tiles
        c = tid
        while c < d:
            k_mn[c] = _F32_INF
            k_mx[c] = -_F32_INF
            k_bad[c] = 0
            c += nt
        for sub in range(n_sub):
            load_keys(k, norms, b, h, s, kg * key_group_size + sub * TILE, tile, tid)
            # thread (r = tid // d, c = tid % d): channel c over tokens r, r + k_parts, ...
            c = tid % d
            while c < d:
                mn = _F32_INF
                mx = -_F32_INF
                bad = 0
                for t in range(tid // d, TILE, k_parts):
                    mn, mx, bad = minmax_update(tile[t, c], mn, mx, bad)
                i = (tid // d) * d + c
                red_mn[i] = mn
                red_mx[i] = mx
                red_bad[i] = bad
                c += c_step
            cuda.syncthreads()
            c = tid
            while c < d:
                mn = k_mn[c]
                mx = k_mx[c]
                bad = k_bad[c]
                for r in range(k_parts):
                    i = r * d + c
                    if red_mn[i] < mn:
                        mn = red_mn[i]
                    if red_mx[i] > mx:
                        mx = red_mx[i]
                    bad |= red_bad[i]
                k_mn[c] = mn
                k_mx[c] = mx
                k_bad[c] = bad
                c += nt
            cuda.syncthreads()
        c = tid
        while c < d:
            sc, mn_s, fl = group_params(k_mn[c], k_mx[c], k_bad[c], k_levels)
            k_params[b, h, kg, c, 0] = sc
            k_params[b, h, kg, c, 1] = mn_s
            k_scale[c] = sc
            k_min[c] = mn_s
            flags |= fl
            c += nt
        cuda.syncthreads()

        # ---- keys, pass 2: codes, packed lane = token
        for sub in range(n_sub):
            if n_sub > 1:
                load_keys(k, norms, b, h, s, kg * key_group_size + sub * TILE, tile, tid)
            p = tid
            while p < TILE * k_words:
                lane = p % TILE
                w = p // TILE
                word = 0
                for j in range(k_cpw):
                    c = w * k_cpw + j
                    code = quant_code(tile[lane, c], k_min[c], k_scale[c], k_levels)
                    word |= code << (key_bits * j)
                k_codes[b, h, kg * n_sub + sub, w, lane] = word
                p += nt
            cuda.syncthreads()

        # ---- values: per token, groups of value_group_size channels
        for sub in range(n_sub):
            t0 = kg * key_group_size + sub * TILE
            load_values(v, norms, b, h, s, t0, tile, tid)
            gbase = 0
            while gbase < v_groups:  # uniform trip count: barriers inside are safe
                gi = gbase + tid // v_parts
                r = tid % v_parts
                t = gi // v_groups_per_token
                g = gi - t * v_groups_per_token
                mn = _F32_INF
                mx = -_F32_INF
                bad = 0
                if gi < v_groups:
                    for w in range(r, v_words_per_group, v_parts):
                        c0 = (g * v_words_per_group + w) * v_cpw
                        for j in range(v_cpw):
                            mn, mx, bad = minmax_update(tile[t, c0 + j], mn, mx, bad)
                red_mn[tid] = mn
                red_mx[tid] = mx
                red_bad[tid] = bad
                cuda.syncthreads()
                if gi < v_groups:
                    first = tid - r
                    for rr in range(v_parts):
                        if red_mn[first + rr] < mn:
                            mn = red_mn[first + rr]
                        if red_mx[first + rr] > mx:
                            mx = red_mx[first + rr]
                        bad |= red_bad[first + rr]
                    sc, mn_s, fl = group_params(mn, mx, bad, v_levels)
                    if r == 0:
                        v_params[b, h, t0 + t, g, 0] = sc
                        v_params[b, h, t0 + t, g, 1] = mn_s
                        flags |= fl
                    # the codes replace their inputs in the tile (only this thread reads them)
                    for w in range(r, v_words_per_group, v_parts):
                        c0 = (g * v_words_per_group + w) * v_cpw
                        for j in range(v_cpw):
                            tile[t, c0 + j] = np.float32(
                                quant_code(tile[t, c0 + j], mn_s, sc, v_levels))
                cuda.syncthreads()
                gbase += v_groups_per_pass
            # pack in the value tile layout: thread p builds word p of the tile's flat run
            # (coalesced writes); code j of word f is token tt, channel cc of this sub-tile
            p = tid
            while p < v_tile_words:
                word = 0
                for j in range(v_cpw):
                    tt, cc = v_code_at(p, j)
                    word |= int(tile[tt, cc]) << (value_bits * j)
                v_codes[b, h, t0 + p // v_words, p % v_words] = word
                p += nt
            cuda.syncthreads()

        if flags != 0:
            cuda.atomic.or_(status, 0, flags)

    it = INPUT_ELEMENT_TYPES[in_dtype]
    pt = PARAM_TYPES[param_dtype]
    sig = (f"void({it}[:, :, :, :], {it}[:, :, :, :], uint32[:, :, :, :, :], {pt}[:, :, :, :, :], "
           f"uint32[:, :, :, :], {pt}[:, :, :, :, :], float32[:, :, :], int32[:])")
    return quantize_kernel, sig


def _quantize_key(config, head_dim: int, in_dtype: str, threads: int = THREADS) -> tuple:
    """The factory key of a configuration (flags that do not change the code are normalized)."""
    return (config.key_bits, config.value_bits, config.key_group_size, config.value_group_size,
            head_dim, in_dtype, config.param_dtype, config.rotate_keys, config.scale_tokens,
            config.rotate_values, config.scale_tokens and config.norm_scope == "head", threads)


@functools.lru_cache(maxsize=None)
def _quantize_kernel(key: tuple):
    fn, sig = _quantize_source(*key)
    return cuda.jit(sig)(fn)


@functools.lru_cache(maxsize=None)
def _norm_kernel(key: tuple):
    fn, sig = _norm_source(*key)
    return cuda.jit(sig)(fn)


def _norm_key(config, head_dim: int, in_dtype: str, num_kv_heads: int,
              threads: int = THREADS) -> tuple:
    head_scope = config.norm_scope == "head"
    levels = 0 if head_scope else _levels(num_kv_heads)
    return (head_dim, in_dtype, config.rotate_keys, levels, head_scope, threads)


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


def quantize_block(k, v, k_codes, k_params, v_codes, v_params, norms, status, config, in_dtype,
                   stream=0, *, threads: int = THREADS) -> None:
    """Quantize and pack ``k, v [batch, num_kv_heads, seq_len, head_dim]`` into the given arrays.

    Equals :func:`oscar.reference.block.quantize_block` on ``float32(k), float32(v)`` bit for bit
    (see the module spec sheet for the error groups). ``status`` (int32[1], device) is OR-ed with
    ``STATUS_NONFINITE`` / ``STATUS_FLOAT16_RANGE``; it is not cleared here. ``threads``
    (threads per block, a power of two >= 32) is a launch-configuration override for tests.
    """
    check_threads(threads)
    bsz, heads, seq, d = check_block_arrays(k, v, k_codes, k_params, v_codes, v_params, norms,
                                            config, in_dtype)
    if tuple(status.shape) != (1,) or np.dtype(status.dtype) != np.int32:
        raise ValueError(f"status: expected an int32 array of shape (1,), got "
                         f"{np.dtype(status.dtype).name} {tuple(status.shape)}")
    if seq == 0 or bsz == 0 or heads == 0:
        return
    if config.scale_tokens:
        nkey = _norm_key(config, d, in_dtype, heads, threads)
        tt = norm_tile_tokens(d, nkey[3])
        grid_s = heads if nkey[4] else 1
        _norm_kernel(nkey)[(seq // tt, grid_s, bsz), threads, stream](k, norms)
    kernel = _quantize_kernel(_quantize_key(config, d, in_dtype, threads))
    kernel[(seq // config.key_group_size, heads, bsz), threads, stream](
        k, v, k_codes, k_params, v_codes, v_params, norms, status)


# --- compile registry -----------------------------------------------------------------------------


def _representative_configs():
    """Configurations that together take every branch of the factories (compile checks)."""
    from oscar.config import OScaRConfig

    yield OScaRConfig(), 128, "bfloat16"
    yield (OScaRConfig(key_bits=4, value_bits=8, value_group_size=64, param_dtype="float32"), 64,
           "float16")
    yield OScaRConfig(key_bits=8, value_bits=4, key_group_size=64, norm_scope="head"), 256, \
        "float32"
    yield OScaRConfig(key_group_size=128, value_group_size=32, rotate_keys=False,
                      rotate_values=False, scale_tokens=False, residual_length=128), 32, "float16"
    yield OScaRConfig(key_bits=2, value_bits=8, value_group_size=4, scale_tokens=False), 256, \
        "bfloat16"


def compile_signatures():
    """(name, python function, signature) of a representative set of kernels for compile checks."""
    norm_keys = set()
    for cfg, d, in_dtype in _representative_configs():
        key = _quantize_key(cfg, d, in_dtype)
        fn, sig = _quantize_source(*key)
        yield f"quantize.quantize{key}", fn, sig
        if cfg.scale_tokens:
            for heads in (1, 5):  # scope "token": no head tree; a 3-level tree with 3 zero pads
                nkey = _norm_key(cfg, d, in_dtype, heads)
                if nkey not in norm_keys:
                    norm_keys.add(nkey)
                    fn, sig = _norm_source(*nkey)
                    yield f"quantize.norms{nkey}", fn, sig
