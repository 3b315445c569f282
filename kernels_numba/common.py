"""Device functions shared by the kernels: bit casts, bfloat16 loads, exact rounding, the FWHT.

Each has a GPU implementation (libdevice / plain arithmetic compiled by NVVM) and, where the CUDA
simulator lacks the GPU primitive (libdevice bit casts return NaN there), a NumPy shim with the
same semantics. Which one is used is fixed at import time by ``SIMULATOR``.
"""

from __future__ import annotations

import functools
import math

from ._compat import SIMULATOR, cuda, np

if SIMULATOR:

    @cuda.jit(device=True)
    def int_as_float(i):
        """Reinterpret the 32 bits of an int as float32 (simulator shim)."""
        return np.array([i], dtype=np.int64).astype(np.uint32).view(np.float32)[0]

    @cuda.jit(device=True)
    def float_as_int(x):
        """Reinterpret a float32's bits as int32 (simulator shim)."""
        return np.int32(np.array([x], dtype=np.float32).view(np.int32)[0])

else:
    from numba.cuda import libdevice

    int_as_float = libdevice.int_as_float
    float_as_int = libdevice.float_as_int


@cuda.jit(device=True)
def bf16_bits_to_f32(bits):
    """bfloat16 stored as int16 (torch exports bfloat16 as a void type) to float32, exactly."""
    return int_as_float(np.int32((np.int32(bits) & np.int32(0xFFFF)) << np.int32(16)))


@cuda.jit(device=True)
def f32_to_bf16_bits(x):
    """float32 to bfloat16 bits as int16, rounded to nearest even like torch's
    ``.to(torch.bfloat16)`` (NaN -> the quiet NaN 0x7FC0). In int32 arithmetic: a finite or
    infinite value plus the rounding bias cannot overflow, and the arithmetic shift leaves the
    high half in int16 range."""
    if x != x:
        return np.int16(0x7FC0)
    u = np.int32(float_as_int(x))
    u = u + np.int32(0x7FFF) + ((u >> np.int32(16)) & np.int32(1))
    return np.int16(u >> np.int32(16))


@cuda.jit(device=True)
def rint_half_even(y):
    """Round float32 ``y`` to the nearest integer, ties to even (= numpy.rint), as float32.

    ``y - floor(y)`` is exact for |y| < 2**23, the range the quantizer uses (codes <= 255).
    """
    r = math.floor(y)
    d = y - r
    if d > np.float32(0.5):
        r += np.float32(1.0)
    elif d == np.float32(0.5):
        if math.fmod(r, np.float32(2.0)) != np.float32(0.0):
            r += np.float32(1.0)
    return np.float32(r)


@cuda.jit(device=True)
def fwht_shared(buf, rows, d, tid, nthreads):
    """In-place unnormalized Walsh-Hadamard transform of ``buf[0:rows, 0:d]`` (shared memory).

    Same butterflies in the same stage order as ``reference.hadamard_transform``: stage h pairs
    ``(i, i + h)`` with ``i & h == 0`` and writes ``(a + b, a - b)`` -- bit-identical float32.
    All ``nthreads`` threads of the block must call it; it ends with a barrier. ``d`` is a power
    of two, so every index is a 32-bit shift or mask (the ``//`` and ``%`` by the stage width
    were 64-bit divisions: about 5,800 cycles for 4 rows of 128 on the H200, now a few hundred).
    """
    half = np.int32(d // 2)
    lhalf = np.int32(0)
    while (np.int32(1) << lhalf) < half:
        lhalf += np.int32(1)
    n = np.int32(rows) * half
    lg = np.int32(0)
    while (np.int32(1) << lg) < np.int32(d):
        h = np.int32(1) << lg
        cuda.syncthreads()
        p = np.int32(tid)
        while p < n:
            row = p >> lhalf
            j = p & (half - np.int32(1))
            i = ((j >> lg) << (lg + np.int32(1))) | (j & (h - np.int32(1)))
            a = buf[row, i]
            b = buf[row, i + h]
            buf[row, i] = a + b
            buf[row, i + h] = a - b
            p += np.int32(nthreads)
        lg += np.int32(1)
    cuda.syncthreads()


@functools.lru_cache(maxsize=None)
def fwht_lanes(per_lane, lanes):
    """Device function ``fwht(x, lane)``: in-place unnormalized Walsh-Hadamard transform of one
    row of ``per_lane * lanes`` channels held by ``lanes`` adjacent lanes of a warp (a power of
    two, 1..32), ``x`` = the ``per_lane`` consecutive channels ``(lane % lanes) * per_lane ...``
    of this lane (a local array).

    Stages h < per_lane run inside the lane; the others (h = per_lane << i) are ``shfl_xor``
    butterflies with lane ``lane ^ (1 << i)``: the lower lane of a pair computes ``x + o`` and
    the upper one ``-x + o`` (one FFMA, the product by -1 exact), i.e. ``(a + b, a - b)``. The
    same additions in the same stage order as ``reference.hadamard_transform`` (and
    :func:`fwht_shared`), so the same float32 bits, with no barrier. Every lane of the warp must
    call it (the shuffles are warp-wide; ``lanes < 32`` holds 32 / lanes rows at once). Used by
    the quantize kernel (runs of 32 channels, head_dim / 32 lanes per token) and, through
    :func:`fwht_warp`, by the decode kernels (one row per warp)."""
    lin = per_lane.bit_length() - 1  # stages inside a lane: h = 1 .. per_lane / 2
    lcross = lanes.bit_length() - 1  # then h = per_lane << i: lane xor (1 << i)
    half = per_lane // 2

    @cuda.jit(device=True)
    def fwht(x, lane):
        for st in range(lin):
            h = 1 << st
            for p in range(half):
                i = ((p >> st) << (st + 1)) | (p & (h - 1))
                a = x[i]
                c = x[i + h]
                x[i] = a + c
                x[i + h] = a - c
        for st in range(lcross):
            m = 1 << st
            sg = np.float32(1.0) if (lane & m) == 0 else np.float32(-1.0)
            for j in range(per_lane):
                o = cuda.shfl_xor_sync(0xFFFFFFFF, x[j], m)
                x[j] = sg * x[j] + o

    return fwht


def fwht_warp(d):
    """:func:`fwht_lanes` for one length-``d`` row per warp: ``x`` = the ``d / 32`` consecutive
    channels ``lane * d / 32 ...`` of this lane."""
    return fwht_lanes(d // 32, 32)


def device_pointer(arr) -> int:
    """Address of element 0 of a device array (in the simulator: of the host buffer behind it),
    for the 16-byte alignment checks of the kernels that read rows as 16-byte vectors."""
    host = getattr(arr, "_ary", None)  # a simulator array wraps an ndarray
    if SIMULATOR and host is not None:
        return int(host.ctypes.data)
    return int(arr.__cuda_array_interface__["data"][0])


# --- added for the quantize / dequantize / hadamard kernels -----------------------------------


def arithmetic_device(fn):
    """``cuda.jit(device=True)`` for a device function that only computes (no ``cuda.*`` calls);
    in the simulator, the plain Python function.

    The simulator wraps every device-function call in a swap of the module's ``cuda`` global
    under two locks (~10 us per call, against ~1 us for a plain call); helpers called once or more
    per element would dominate simulated test time. The GPU build is unchanged.
    """
    return fn if SIMULATOR else cuda.jit(device=True)(fn)


def plain_in_simulator(device_fn):
    """The Python body of a compute-only ``cuda.jit(device=True)`` function in the simulator
    (see :func:`arithmetic_device`); the device function itself on the GPU."""
    return device_fn.__wrapped__ if SIMULATOR else device_fn


#: Numba element type of a 4-D / 2-D input array per input dtype name. bfloat16 arrives as int16
#: bits (torch exports bfloat16 through __cuda_array_interface__ as a void type).
INPUT_ELEMENT_TYPES = {"float16": "float16", "bfloat16": "int16", "float32": "float32"}

if SIMULATOR:

    def mul_rn(a, b):
        """float32 product rounded once (simulator shim: NumPy float32 multiply; a plain
        function, see :func:`arithmetic_device`)."""
        return np.float32(np.float32(a) * np.float32(b))

else:
    # mul.rn.f32: PTX never fuses an instruction with an explicit rounding mode into an FMA,
    # whereas a plain mul.f32 followed by add.f32 is contracted to one fma by ptxas (--fmad=true
    # is the default and numba-cuda exposes no switch). Use this wherever a product feeds an add
    # and the result must equal the NumPy reference bit for bit.
    mul_rn = libdevice.fmul_rn


@arithmetic_device
def to_float32(x):
    """float16 / float32 element to float32 (exact)."""
    return np.float32(x)


def float32_loader(in_dtype: str):
    """The device function that turns one input element of ``in_dtype`` into float32, exactly."""
    if in_dtype == "bfloat16":
        return plain_in_simulator(bf16_bits_to_f32)
    if in_dtype in ("float16", "float32"):
        return to_float32
    raise ValueError(f"in_dtype: expected one of {tuple(INPUT_ELEMENT_TYPES)}, got {in_dtype!r}")


def check_threads(threads) -> None:
    """ValueError unless ``threads`` (threads per block of a launch) is a power of two, 32..1024."""
    if (isinstance(threads, bool) or not isinstance(threads, int) or not 32 <= threads <= 1024
            or threads & (threads - 1)):
        raise ValueError(f"threads: expected a power of two from 32 to 1024, got {threads!r}")


#: The per-row lengths array every decode kernel reads (int32 ``[batch, LENGTH_COLUMNS]``, on the
#: device; docs/kernels.md "Lengths on the device"): LEN_START the row's first visible token (left
#: padding, a sliding window; 0 = all), LEN_QUANTIZED its packed tokens, LEN_RESIDUAL its residual
#: tokens, LEN_FLUSH 1 when the last device append filled the row's window (the flush kernel then
#: packs it at ``quantized - R``). On the device one writer per row changes them: the append
#: kernel (one block per row), so that no block reads a length another block is changing.
LEN_START, LEN_QUANTIZED, LEN_RESIDUAL, LEN_FLUSH = 0, 1, 2, 3
LENGTH_COLUMNS = 4


@cuda.jit(device=True)
def split_block(bx, num_kv_heads, quantized_len, num_splits, tiles_per_group, first):
    """``(batch, kv_head, split, begin, end)`` of this block of a decode split kernel (grid
    ``(batch * num_kv_heads [* row blocks], first + num_splits)``; ``bx`` = ``blockIdx.x``, or
    its quotient by the v3 kernel's row blocks): the split's 32-token tiles are ``[begin,
    end)``; split ``blockIdx.y - first`` (negative for the ``first`` block rows that do other
    work: the v3 kernel's residual blocks).

    Each split takes ``ceil(tiles / num_splits)`` tiles rounded up to whole key groups
    (``tiles_per_group`` tiles), so a split always starts a key group; trailing splits may be
    empty (``begin >= end``). Shared by the three split kernels so they partition alike.
    """
    b = bx // num_kv_heads
    kvh = bx % num_kv_heads
    split = cuda.blockIdx.y - first
    ntiles = quantized_len // 32
    per = (ntiles + num_splits - 1) // num_splits
    per = (per + tiles_per_group - 1) // tiles_per_group * tiles_per_group
    begin = split * per
    return b, kvh, split, begin, min(begin + per, ntiles)


@cuda.jit(device=True)
def write_empty_split(ws_max, ws_sum, ws_acc, b, kvh, split, tid, nthreads, rows, head_dim,
                      gqa, q_len, row0):
    """Partials of a split with no tile: max -inf, sum 0, value sum 0 for its ``rows`` query rows
    ``row0 .. row0 + rows - 1`` (row r = query head ``kvh * gqa + r // q_len``, position ``r %
    q_len``; ``row0`` > 0 in the v3 kernel's row blocks). All threads of the block call it; the
    merge kernel then gives the split weight 0."""
    for idx in range(tid, rows * head_dim, nthreads):
        r = row0 + idx // head_dim
        ws_acc[b, kvh * gqa + r // q_len, r % q_len, split, idx % head_dim] = np.float32(0.0)
    if tid < rows:
        r = row0 + tid
        ws_max[b, kvh * gqa + r // q_len, r % q_len, split] = np.float32(-math.inf)
        ws_sum[b, kvh * gqa + r // q_len, r % q_len, split] = np.float32(0.0)


@arithmetic_device
def value_code_location(t, c, head_dim, bits):
    """``(word, shift)`` of value code (token ``t`` < 32, channel ``c``) of a 32-token tile: the
    index into the tile's flat run of ``head_dim * bits`` words and the bit of its lowest bit.
    The formula of ``reference.pack.value_code_location`` (docs/format.md, "Value tiles"); with
    ``head_dim`` and ``bits`` compile-time constants it folds to shifts and masks."""
    kb = t >> 4
    r = t & 15
    chunk = c >> 4
    slot = (((((kb * 8 + (c & 7)) * 4 + (r & 3)) * 2 + (r >> 3)) * 2 + ((c >> 3) & 1))
            * (head_dim // 16) + chunk)
    per_half = 16 // bits
    return slot // per_half, 16 * ((r >> 2) & 1) + bits * (slot % per_half)


@arithmetic_device
def value_param_location(t, j, part, groups):
    """``(row, group, part)`` where param ``part`` (0 scale, 1 min) of value group ``j`` of token
    ``t`` (< 32) of a 32-token tile is stored, as indices into the tile's rows of
    ``v_params[b, h, 32*i : 32*i + 32, :, :]``. The formula of
    ``reference.pack.value_param_location`` (docs/format.md, "Value param tiles"): the flat index
    ``(((((kb*2 + part)*4 + t4)*groups + j)*2 + pair)*2 + half`` of ``t = 16*kb + 8*pair +
    4*half + t4``, split into the array's three inner indices. The min of (t, j) is 16 * groups
    elements, i.e. exactly 8 rows, after its scale (same group and part slots)."""
    r = t & 15
    e = (((((t >> 4) * 2 + part) * 4 + (r & 3)) * groups + j) * 2 + (r >> 3)) * 2 + ((r >> 2) & 1)
    return e // (2 * groups), (e >> 1) % groups, e & 1
