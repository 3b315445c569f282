"""Decode attention straight from the packed cache, and the one place that decides what runs.

Computes exactly :func:`oscar.reference.attention.decode_attention` (SPEC section 5) in float32:

    s_t = scale * n_t * (H q_h) . u_hat_t      quantized token t (H q only with rotate_keys;
                                               n_t = 1 without scale_tokens)
    s_r = scale * q_h . k_r                    residual token r
    p   = softmax over the causally visible tokens (max-subtracted), lse = log sum exp
    out = H (sum_t p_t v_rot_hat_t) + sum_r p_r v_r      (H only with rotate_values)

Query row i of ``q_len`` sits at position ``T - q_len + i`` (T = quantized_len + residual_len)
and sees tokens ``0 .. T - q_len + i``. Query head h reads KV head ``h // G``, G = Hq / H.
Flash-decoding: split kernels stream contiguous ranges of 32-token tiles and write per (batch,
query head, row, split) a running max, a sum of exps and an unnormalized value sum to a float32
workspace (:func:`workspace_shapes`); a merge combines them by log-sum-exp.

What runs for my configuration (``rows = G * q_len``; one :func:`decode_attention` call):

======================  ===================================================================
split kernel (launch 1)  **v3**, attention_mma.py (tensor cores, inline PTX; ptx_sim.py in the
                         simulator) when ``SPLIT_VERSION == 3`` (the default) and
                         ``attention_mma.unsupported(key_bits, value_bits, value_group_size,
                         head_dim, rows, param_dtype)`` is None, i.e. all of: rows <= 32
                         per block (beyond 8 in row groups: RG = ceil(rows / 8) warps share
                         each staged tile, ``attention_mma.row_groups``; beyond one block's
                         rows in up to 8 row blocks of equal rows, x-adjacent in the grid,
                         :func:`row_blocks`: 64 rows at head_dim 128 in one launch of 2 x 32);
                         param_dtype float16;
                         head_dim a multiple of 16; value groups of >= 16 channels and at
                         most 8 per head; ``head_dim * key_bits`` and
                         ``head_dim * value_bits`` multiples of 128; v3's static shared memory
                         <= 48 KB. Otherwise **v1**, attention_v1.py (float32 CUDA cores; its
                         docstring lists the configurations it exists for; ValueError where its
                         own shared memory does not fit). ``SPLIT_VERSION == 1``: v1 always.
residual tokens          **residual blocks** (attention_residual.py: extra block rows of the
                         v3 launch, partial at workspace slot ``num_splits``) when v3 runs,
                         ``residual_len > 0``, ``attention_residual.unsupported`` is None (a
                         residual row of head_dim elements is a power-of-two 64..2048 bytes;
                         rows <= 32 a block; ROWS_PER_BLOCK x residual_length scores fit
                         v3's staging buffers; with row blocks, the head's residual blocks
                         spread over them), and RESIDUAL_BLOCKS is ``"on"``, or ``"auto"`` and the
                         grid ``batch * num_kv_heads * (num_splits + residual rows)`` fits one
                         wave of resident blocks (:func:`residual_block_rows`). Otherwise the
                         merge kernel scores them.
merge                    **fused** into the v3 launch (attention_fused.py: the last block of
                         each (batch, KV head) merges; no second launch) when FUSED_MERGE, v3
                         runs, the merge kernel need not score the residual (residual blocks
                         run, or ``residual_len == 0``), ``num_splits + residual rows <=
                         FUSED_MAX_ARRIVALS`` and ``ceil(quantized_len / 32) <=
                         FUSED_MAX_TILES_PER_SPLIT * num_splits`` (:func:`merge_in_split`).
                         Otherwise the **merge kernel**, attention_merge.py (launch 2).
paged cache              ``decode_attention(..., block_table=, page_size=)`` (issue 27): the
                         **paged v3** split kernel, v3 compiled with ``page_size`` in its key
                         (attention_mma.build_split_v3: tile t of row b read from page
                         ``block_table[b, t // (P / 32)]`` of the pool's section views; every
                         other line is the contiguous kernel's), where
                         :func:`paged_unsupported` is None (v3 runs and P is a multiple of 32
                         and of the key group); residual blocks, fused merge and merge kernel
                         as above. No v1 specialization: oscar/_paged_cuda.py gathers pages into
                         a contiguous workspace for the v1 configurations. Equal to the
                         contiguous v3 kernel bit for bit on an H100 (2026-12-08).
num_splits               the caller's: :func:`plan_splits` fills one wave of resident blocks
                         (v3: from its compiled registers and shared memory; v1:
                         TARGET_BLOCKS_PER_SM), leaving slots for residual blocks
                         (:func:`residual_reserve`), at least MIN_TILES_PER_SPLIT tiles a split.
======================  ===================================================================

The module switches (SPLIT_VERSION, RESIDUAL_BLOCKS, FUSED_MERGE, V3_MAX_REGISTERS; environment
variables, and a benchmark may flip them between calls) are read here only. Kernels are
specialized by cached factories (:func:`_compiled_split`, :func:`_merge_kernel`) on the
compile-time parameters (bits, groups, head_dim, G * q_len, dtypes, flags); q_len is part of the
key, since it sets the register and shared-memory layout (decode uses one or a few fixed q_len).
Every split kernel takes the same arguments (:func:`_split_signature`), so one launch fits all.

Limits: head_dim a power of two in 32..256; key/value bits 2, 4, 8; key groups 32/64/128; any
value group of the configuration; ``num_splits <= MAX_SPLITS``; rows as the split kernel that
runs allows (v3: 32, where its shared memory fits: head_dim 256 at most 8 rows; v1: up to 128,
by shared memory).

History: split kernel v2 (one tile per warp, float32; attention_split.py) was removed on
2026-12-07; its measured numbers stay in docs/kernels.md.
"""

from __future__ import annotations

import functools

from ._compat import SIMULATOR, cuda, np
from .kernel_cache import jit, launch
from . import attention_fused as _fused
from . import attention_merge as _merge
from . import attention_mma as _split_v3
from . import attention_residual as _res
from . import attention_v1 as _v1
from .attention_merge import merge_geometry as _merge_geometry  # noqa: F401 (tests use it)
from .common import (LEN_QUANTIZED, LEN_RESIDUAL, LEN_START, LENGTH_COLUMNS,  # noqa: F401
                     bf16_bits_to_f32, device_pointer, f32_to_bf16_bits)

#: Which split kernel to build: 3 (default) = tensor cores through inline PTX (attention_mma.py;
#: in the CUDA simulator through ptx_sim.py), for the configurations it supports
#: (``attention_mma.unsupported``); the others use v1. 1 = the float32 tile-per-block kernel
#: (attention_v1.py) everywhere. Environment: OSCAR_SPLIT_KERNEL.
SPLIT_VERSION = int(__import__("os").environ.get("OSCAR_SPLIT_KERNEL", "3"))
#: Split kernel versions there are (2 was removed on 2026-12-07).
SPLIT_VERSIONS = (1, 3)
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
#: Register cap of the v3 split kernel: 128 gives 4 blocks (16 warps) per SM without spills
#: (ptxas alone picks ~137, i.e. 3 blocks). None: ptxas decides. Environment:
#: OSCAR_V3_MAX_REGISTERS (0 = no cap).
V3_MAX_REGISTERS = int(__import__("os").environ.get("OSCAR_V3_MAX_REGISTERS", "128")) or None

#: Threads per block of every kernel launched here (each kernel module declares its own
#: NUM_THREADS; the check below keeps them equal).
NUM_THREADS = 128
WARP_SIZE = 32
NUM_WARPS = NUM_THREADS // WARP_SIZE
#: Tokens per key tile of the packed layout (reference/pack.py TILE_TOKENS): every split kernel
#: streams whole tiles, so splits are planned in tiles.
TILE_TOKENS = 32
#: Upper bound of num_splits: sizes the merge kernel's weight buffer and keeps gridDim.y small.
MAX_SPLITS = 256
#: A split should stream at least this many tiles (256 tokens), or its fixed cost (query load,
#: rotation, partial write of rows * D floats, one merge term) outweighs its share of the cache.
MIN_TILES_PER_SPLIT = 8
#: Blocks per SM to aim for when splitting: enough resident blocks to cover load latency
#: (a block uses ~10 KB of shared memory and 128 threads, so 4 fit easily).
TARGET_BLOCKS_PER_SM = 4

Q_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.int16}
PARAM_DTYPES = {"float16": np.float16, "float32": np.float32}
_SIG_TYPE = {"float16": "float16", "float32": "float32", "bfloat16": "int16"}

if {m.NUM_THREADS for m in (_v1, _split_v3, _res, _fused, _merge)} != {NUM_THREADS}:
    raise ImportError(f"the attention kernel modules disagree on NUM_THREADS ({NUM_THREADS})")


# --- dtype helpers handed to the kernel builders ------------------------------------------

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



def _hadamard_scale(head_dim):
    """float32(1/sqrt(D)), rounded once as in reference.hadamard.hadamard_scale."""
    return float(np.float32(1.0 / np.sqrt(np.float64(head_dim))))


# --- which kernels run ----------------------------------------------------------------------


def _uses_v3(key):
    """True when the split kernel of ``key`` (:func:`_split_key`) is v3 (the table above)."""
    kb, vb, _, gv, d, g, lq, pdt = key[:8]
    return SPLIT_VERSION == 3 and _split_v3.unsupported(kb, vb, gv, d, g * lq, pdt) is None


def rows_fit(config, head_dim, gqa, q_len) -> bool:
    """True when a split kernel (v3, else v1) takes ``gqa * q_len`` query rows per KV head."""
    key = _split_key(config, head_dim, gqa, q_len, "float32", "float32")
    if _uses_v3(key):
        return True
    lay = _v1._split_layout(config.key_bits, config.value_bits, config.key_group_size,
                            config.value_group_size, head_dim, gqa * q_len)
    return lay["tpr"] != 0 and lay["smem"] <= _v1.SHARED_MEMORY_LIMIT


def head_groups(config, head_dim, gqa, q_len):
    """The fewest query-head groups ``s`` (a divisor of ``gqa``) such that a split kernel takes
    ``gqa / s * q_len`` rows per KV head, or None when even one query head per KV head is too
    many rows (q_len alone). A decode step with ``s > 1`` runs as ``s`` launches over
    ``gqa / s`` query heads of each KV head (each reads the packed cache again: ``s`` times the
    bytes of one step); docs/kernels.md, "Beyond 32 rows". Since v3's row blocks (up to 256
    rows in one launch) this is > 1 only for v1 configurations (e.g. float32 params) and rows
    that do not split into equal row blocks."""
    for s in range(1, gqa + 1):
        if gqa % s == 0 and rows_fit(config, head_dim, gqa // s, q_len):
            return s
    return None


def _split_signature(param_dtype, q_dtype, res_dtype, out_dtype, paged=False):
    """Numba signature of every split kernel (v1, v3, v3 fused): the arguments
    :func:`decode_attention` passes to launch 1. ``paged``: the paged v3 specialization's (the
    five packed arrays are strided page views, layout ``A``; one more argument, the int32
    block table)."""
    p, q, r, o = param_dtype, _SIG_TYPE[q_dtype], _SIG_TYPE[res_dtype], _SIG_TYPE[out_dtype]
    if paged:
        packed = (f"uint32[:, :, :, :, :], {p}[:, :, :, :, :], uint32[:, :, :, :], "
                  f"{p}[:, :, :, :, :], float32[:, :, :], ")
        tail = ", int32[:, ::1])"
    else:
        packed = (f"uint32[:, :, :, :, ::1], {p}[:, :, :, :, ::1], uint32[:, :, :, ::1], "
                  f"{p}[:, :, :, :, ::1], float32[:, :, ::1], ")
        tail = ")"
    return (f"void({q}[:, :, :, ::1], {packed}"
            f"{r}[:, :, :, ::1], {r}[:, :, :, ::1], "
            "float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, :, ::1], "
            f"float32, int32, int32, int32, int32, {o}[:, :, :, ::1], float32[:, :, ::1], "
            f"int32[:, ::1], int32, int32[:, ::1]{tail}")


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
    per_block = _split_v3.block_rows(key_bits, value_bits, value_group_size, head_dim, rows)
    return _res.unsupported(head_dim, residual_length, per_block, res_dtype, words) is None


def _build_split(key_bits, value_bits, key_group_size, value_group_size, head_dim, gqa, q_len,
                 param_dtype, q_dtype, rotate_keys, scale_tokens, norm_per_head, res_dtype,
                 residual_length, out_dtype="float32", rotate_values=True, fused=False,
                 page_size=0):
    """Python function and signature of the split kernel for one compile-time configuration.

    ``SPLIT_VERSION == 3``: the tensor-core kernel (``attention_mma``) where it supports the
    configuration, with the residual blocks of ``attention_residual`` where
    :func:`residual_in_split`; the v1 kernel (``attention_v1``) otherwise (docs/kernels.md
    compares them). Both take the residual arrays and the fused merge's arguments (only v3
    uses them; with ``fused``, ``attention_fused``: the last block of each (batch, KV head)
    merges into ``out`` and ``lse`` when the launch passes ``fuse = 1``) so that one launch fits
    all. The fused variant is a separate compile: its merge code costs the tile loop registers
    (B=8 128K 2% slower with it), so launches that do not fuse use the plain kernel.

    ``page_size`` > 0: the paged specialization of v3 (``attention_mma.build_split_v3``; the
    packed arrays are a page pool's section views, one more argument: the block table). Only
    v3 has one: ValueError where v3 does not run (:func:`paged_unsupported`).
    """
    if SPLIT_VERSION not in SPLIT_VERSIONS:
        raise ValueError(f"SPLIT_VERSION (environment OSCAR_SPLIT_KERNEL): expected one of "
                         f"{SPLIT_VERSIONS}, got {SPLIT_VERSION!r} (v2 was removed on "
                         "2026-12-07)")
    D, G, LQ = head_dim, gqa, q_len
    ROWS = G * LQ
    sig = _split_signature(param_dtype, q_dtype, res_dtype, out_dtype, paged=page_size > 0)
    if page_size and not (SPLIT_VERSION == 3 and _split_v3.unsupported(
            key_bits, value_bits, value_group_size, D, ROWS, param_dtype) is None):
        raise ValueError(f"page_size {page_size}: the paged decode kernel is v3's only, which "
                         f"does not run here (SPLIT_VERSION {SPLIT_VERSION}; "
                         f"{_split_v3.unsupported(key_bits, value_bits, value_group_size, D, ROWS, param_dtype)})")
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
            residual, finish, page_size)
        return fn, sig

    # v1: every configuration v3 does not take (attention_v1.py lists them)
    fn = _v1.build_split_v1(
        key_bits, value_bits, key_group_size, value_group_size, head_dim, gqa, q_len,
        rotate_keys, scale_tokens, norm_per_head, _loader(q_dtype), _hadamard_scale(D))
    return fn, sig


def _merge_signature(q_dtype, res_dtype, out_dtype):
    """Numba signature of the merge kernel: the arguments of launch 2."""
    q, r, o = _SIG_TYPE[q_dtype], _SIG_TYPE[res_dtype], _SIG_TYPE[out_dtype]
    return (f"void({q}[:, :, :, ::1], {r}[:, :, :, ::1], {r}[:, :, :, ::1], "
            "float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, :, ::1], "
            f"{o}[:, :, :, ::1], float32[:, :, ::1], float32, int32, int32, int32, int32, "
            "int32[:, ::1])")


def _build_merge(head_dim, residual_length, q_dtype, res_dtype, rotate_values,
                 out_dtype="float32"):
    """Python function and signature of the merge kernel (attention_merge.py) for one
    compile-time configuration; ``out_dtype`` is float32 or q's dtype (rounded once on the
    store)."""
    fn = _merge.build_merge(head_dim, residual_length, res_dtype, rotate_values,
                            _loader(q_dtype), _storer(out_dtype), _hadamard_scale(head_dim),
                            MAX_SPLITS)
    return fn, _merge_signature(q_dtype, res_dtype, out_dtype)


# --- cached compiled kernels ----------------------------------------------------------------


def _split_kernel(*key):
    """The compiled split kernel of ``key`` under the current module switches (SPLIT_VERSION,
    V3_MAX_REGISTERS, the row limits of :func:`_row_limits`: a benchmark may flip them between
    calls)."""
    return _compiled_split(key, SPLIT_VERSION, V3_MAX_REGISTERS, _row_limits())


@functools.lru_cache(maxsize=None)
def _compiled_split(key, version, max_registers, row_limits):
    fn, sig = _build_split(*key)  # reads the same switches
    name = f"split_v{3 if _uses_v3(key) else 1}" + ("_paged" if _page_size(key) else "")
    # the row blocks change the kernel for the same key: they enter the kernel-cache key
    ckey = key + (("row_blocks", row_blocks(key)),)
    if _uses_v3(key) and max_registers and not SIMULATOR:
        return jit(fn, sig, name=name, key=ckey, max_registers=max_registers)
    return jit(fn, sig, name=name, key=ckey)


def _row_limits():
    """``(attention_mma.ROWS_MAX, attention_mma.MAX_ROW_BLOCKS)``: the rows one v3 block may
    hold and the most row blocks. They decide the kernel a key compiles to, so the cached
    kernels and plans are keyed on them too (benchmarks/multirow.py varies them)."""
    return _split_v3.ROWS_MAX, _split_v3.MAX_ROW_BLOCKS


def row_blocks(split_key):
    """Blocks per (batch, KV head, split) of the split kernel of ``split_key``: v3's row blocks
    (``attention_mma.row_blocks``: more query rows than one block holds, e.g. 64 at head_dim
    128, run in RB x-adjacent blocks of ``rows / RB`` rows each), 1 for v1."""
    if not _uses_v3(split_key):
        return 1
    kb, vb, _, gv, d, g, lq = split_key[:7]
    return _split_v3.row_blocks(kb, vb, gv, d, g * lq)


def split_blocks_per_sm(config, head_dim, gqa, q_len, q_dtype, res_dtype, page_size=0):
    """Resident blocks per SM of the split kernel for this configuration (from its compiled
    register and shared-memory use; compiles it if needed), for :func:`choose_num_splits`.
    ``page_size`` > 0: of the paged specialization."""
    key = _split_key(config, head_dim, gqa, q_len, q_dtype, res_dtype, page_size=page_size)
    return _blocks_per_sm(key, SPLIT_VERSION, V3_MAX_REGISTERS, _row_limits())


@functools.lru_cache(maxsize=None)
def _blocks_per_sm(key, version, max_registers, row_limits=None):
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


def _split_key(config, head_dim, gqa, q_len, q_dtype, res_dtype, out_dtype=None, fused=False,
               page_size=0):
    """The split kernel's compile-time key: 17 entries (the arguments of :func:`_build_split`
    up to ``fused``), and an 18th, the page size, for the paged specialization only (so that
    the contiguous kernels keep their keys and kernel-cache entries)."""
    key = (config.key_bits, config.value_bits, config.key_group_size, config.value_group_size,
           head_dim, gqa, q_len, config.param_dtype, q_dtype, config.rotate_keys,
           config.scale_tokens, config.norm_scope == "head", res_dtype, config.residual_length,
           q_dtype if out_dtype is None else out_dtype, config.rotate_values, bool(fused))
    return key + (int(page_size),) if page_size else key


#: Entries of a contiguous split key (:func:`_split_key`); a paged key has one more.
_KEY_LEN = 17


def _page_size(split_key):
    """Page size of a split key: 0 for the contiguous kernels."""
    return split_key[_KEY_LEN] if len(split_key) > _KEY_LEN else 0


def _with_fused(split_key, fused):
    """``split_key`` with its ``fused`` entry (index 16) replaced."""
    return split_key[:_KEY_LEN - 1] + (bool(fused),) + split_key[_KEY_LEN:]


@functools.lru_cache(maxsize=None)
def _residual_in_split(split_key, version, row_limits=None):
    """:func:`residual_in_split` of a split key, cached (``version``: SPLIT_VERSION). The paged
    specialization has the same residual blocks."""
    return residual_in_split(*split_key[:_KEY_LEN])


def _residual_rows_per_x(split_key):
    """``(row_blocks, block rows of residual blocks per x-block)``: the head's
    ``attention_residual.blocks_per_head`` residual blocks spread over its row blocks."""
    rb = row_blocks(split_key)
    return rb, -(-_res.blocks_per_head(split_key[5], split_key[6]) // rb)


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
    if not _residual_in_split(split_key, SPLIT_VERSION, _row_limits()):
        return 0
    rb, rows = _residual_rows_per_x(split_key)
    if RESIDUAL_BLOCKS == "auto":
        slots = _blocks_per_sm(split_key, SPLIT_VERSION, V3_MAX_REGISTERS,
                               _row_limits()) * _num_sms()
        if batch * num_kv_heads * rb * (num_splits + rows) > slots:
            return 0
    return rows


def residual_reserve(split_key, batch, num_kv_heads, residual_len, num_sms, blocks_per_sm):
    """Slots :func:`choose_num_splits` should leave for residual blocks: all of them when they
    are at most ``RESIDUAL_RESERVE`` of one wave (a few splits fewer, each a little longer,
    costs less than the merge kernel's residual pass: batch 1 at 32K tokens), else 0 (then
    they run only where the splits leave room, :func:`residual_block_rows`)."""
    if residual_len <= 0 or RESIDUAL_BLOCKS == "off":
        return 0
    if not _residual_in_split(split_key, SPLIT_VERSION, _row_limits()):
        return 0
    rb, rows = _residual_rows_per_x(split_key)
    n = batch * num_kv_heads * rb * rows
    return n if n <= RESIDUAL_RESERVE * blocks_per_sm * num_sms else 0


def merge_in_split(split_key, res_rows, quantized_len, residual_len, num_splits):
    """Whether the split kernel's last blocks merge (``attention_fused``; no merge launch):
    FUSED_MERGE, the v3 kernel, the merge kernel need not score the residual (``res_rows``
    block rows of residual blocks from :func:`residual_block_rows` or no residual tokens), at
    most FUSED_MAX_ARRIVALS blocks feed each merge (``(num_splits + res_rows) * row blocks``),
    and at most FUSED_MAX_TILES_PER_SPLIT tiles per split."""
    tiles = -(-int(quantized_len) // TILE_TOKENS)
    return bool(FUSED_MERGE and _uses_v3(split_key)
                and (res_rows > 0 or int(residual_len) == 0)
                and (int(num_splits) + res_rows) * row_blocks(split_key) <= FUSED_MAX_ARRIVALS
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
        # v3 row groups: 16 rows (2 groups x 2 token lanes: named barriers), 24 rows fused
        (2, 2, 32, 32, 128, 4, 4, "float16", "bfloat16", True, True, False, "bfloat16", 128),
        (4, 4, 32, 32, 64, 8, 3, "float16", "float16", True, True, False, "float16", 64,
         "float16", True, True),
    ]
    # the paged specialization (v3 only; key + page_size): Llama-3.1-8B at P = 128 plain and
    # fused, row groups (q_len 4) at P = 64, and head-scoped norms / no token scaling at P = 32
    paged = [
        (2, 2, 32, 32, 128, 4, 1, "float16", "bfloat16", True, True, False, "bfloat16", 128,
         "bfloat16", True, False, 128),
        (2, 2, 32, 32, 128, 4, 1, "float16", "bfloat16", True, True, False, "bfloat16", 128,
         "bfloat16", True, True, 128),
        (2, 2, 32, 32, 128, 4, 4, "float16", "bfloat16", True, True, False, "bfloat16", 128,
         "bfloat16", True, False, 64),
        (2, 2, 64, 32, 64, 2, 1, "float16", "float16", True, True, True, "float16", 64,
         "float32", True, False, 64),
        (4, 4, 32, 32, 64, 8, 1, "float16", "float16", False, False, False, "float16", 32,
         "float16", True, True, 32),
    ]
    # v3 row blocks (more rows than one block holds; v1 has no kernel for them): 64 rows =
    # GQA 8 at q_len 8, 2 blocks of 32 rows, with the fused merge (arrivals x 2)
    row_blocked = [
        (2, 2, 32, 32, 128, 8, 8, "float16", "bfloat16", True, True, False, "bfloat16", 128,
         "bfloat16", True, True),
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
        for version in SPLIT_VERSIONS:  # every split kernel (v3 falls back to v1)
            SPLIT_VERSION = version
            for key in splits:
                fn, sig = _build_split(*key)
                yield f"attention.split_v{version}{key}", fn, sig
        SPLIT_VERSION = 3
        for key in paged:
            fn, sig = _build_split(*key)
            yield f"attention.split_v3_paged{key}", fn, sig
        for key in row_blocked:
            fn, sig = _build_split(*key)
            yield f"attention.split_v3_row_blocks{key}", fn, sig
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
                quantized_len, residual_len, num_sms, page_size=0):
    """num_splits for one decode call: :func:`choose_num_splits` with the split kernel's
    resident blocks per SM and the slots its residual blocks get (:func:`residual_reserve`).
    ``page_size`` > 0: of the paged specialization."""
    per_sm = split_blocks_per_sm(config, head_dim, gqa, q_len, q_dtype, res_dtype, page_size)
    skey = _split_key(config, head_dim, gqa, q_len, q_dtype, res_dtype, page_size=page_size)
    reserve = residual_reserve(skey, batch, num_kv_heads, residual_len, num_sms, per_sm)
    # row blocks: RB blocks per (batch, KV head, split) share the wave
    return choose_num_splits(batch, num_kv_heads * row_blocks(skey), quantized_len,
                             num_sms=num_sms, blocks_per_sm=per_sm, reserve_blocks=reserve)


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


def _check_step_lengths(quantized_len, residual_len, q_len, num_splits, r_len):
    """The residual length, q_len and split count of a decode step (ValueError naming them)."""
    if not 0 <= residual_len < r_len:
        raise ValueError(f"residual_len: expected 0 <= residual_len < {r_len}, got {residual_len}")
    if not 1 <= q_len <= max(1, quantized_len + residual_len):
        raise ValueError(f"q_len: expected 1 <= q_len <= seq_len ({quantized_len + residual_len}),"
                         f" got {q_len}")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected 1..{MAX_SPLITS}, got {num_splits}")


def _expect_array(name, x, shape, dtype):
    """``x`` is a device array of ``shape`` and ``dtype`` (TypeError/ValueError naming it)."""
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


def _expect(name, x, shape, dtype):
    _expect_array(name, x, shape, dtype)
    if not _c_contiguous(x):  # the kernels address tiles with fixed strides
        raise ValueError(f"{name}: expected a C-contiguous array, got strides "
                         f"{tuple(getattr(x, 'strides', ()))}")


def decode_attention(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse,
                     workspace, config, scale, quantized_len, residual_len, q_dtype, res_dtype,
                     num_splits, lengths=None, stream=0, check=True, block_table=None,
                     page_size=0):
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
        quantized_len: upper bound of the rows' packed tokens (a multiple of key_group_size,
            <= capacity): sizes the split plan (the capacity for a launch that must serve any
            length, e.g. in a CUDA graph).
        residual_len: upper bound of the rows' residual tokens, ``0 <= residual_len <
            residual_length`` (``residual_length - 1`` serves any length).
        lengths: int32 ``[batch, 4]`` on the device (common.LEN_START, LEN_QUANTIZED,
            LEN_RESIDUAL; LEN_FLUSH is the append's): each row's first visible token, packed
            and residual tokens, read by the kernels. Every row's must be within the bounds
            above (tokens past them are not seen). None: every row has ``quantized_len`` and
            ``residual_len`` tokens, start 0 (:func:`uniform_lengths`, a host-to-device copy).
        q_dtype, res_dtype: ``"float16"``, ``"float32"`` or ``"bfloat16"``.
        num_splits: from :func:`choose_num_splits`, 1..MAX_SPLITS.
        stream: the CUDA stream to launch on.
        check: validate every argument first (tens of microseconds of Python); a caller that
            has validated the same buffers once may pass False.
        block_table, page_size: the **paged** cache (docs/serving.md; v3 only,
            :func:`paged_unsupported`). Then ``k_codes`` .. ``norms`` are the section views of
            a page pool, ``[num_pages, ...]`` with the per-page shapes of
            ``reference.paged.PageLayout`` (capacity = ``page_size``; strided: consecutive
            pages ``page_bytes`` apart, each page's inner axes C-contiguous), and row b's
            tile t lives in page ``block_table[b, t // (page_size / 32)]`` (int32 ``[batch,
            max_blocks]``, C-contiguous; its first ``ceil(quantized_len / page_size)``
            entries of each row are read, and ``check`` verifies them on the host: a device
            table is copied back, one synchronization). ``quantized_len`` is then bounded by
            ``max_blocks * page_size`` instead of the capacity.
    """
    if lengths is None:
        lengths = cuda.to_device(uniform_lengths(int(q.shape[0]), quantized_len, residual_len),
                                 stream=stream)
    if check:
        _check_arguments(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse,
                         workspace, config, quantized_len, residual_len, q_dtype, res_dtype,
                         num_splits, lengths, block_table, page_size)
    for kernel, grid, block, args, _names in decode_launches(
            q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse, workspace,
            config, scale, quantized_len, residual_len, q_dtype, res_dtype, num_splits, lengths,
            block_table, page_size):
        launch(kernel, grid, block, stream, *args)


def uniform_lengths(batch, quantized_len, residual_len, start=None):
    """Host int32 ``[batch, LENGTH_COLUMNS]`` lengths of rows that all hold ``quantized_len``
    packed and ``residual_len`` residual tokens (``start``: optional per-row first tokens)."""
    lengths = np.zeros((int(batch), LENGTH_COLUMNS), np.int32)
    lengths[:, LEN_QUANTIZED] = int(quantized_len)
    lengths[:, LEN_RESIDUAL] = int(residual_len)
    if start is not None:
        lengths[:, LEN_START] = np.asarray(start, np.int64)
    return lengths


def decode_launches(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse,
                    workspace, config, scale, quantized_len, residual_len, q_dtype, res_dtype,
                    num_splits, lengths, block_table=None, page_size=0):
    """What :func:`decode_attention` launches, in order: ``[(kernel, grid, block, args)]``.

    The one place that decides which compiled kernels run for a step (the split kernel, with or
    without residual blocks and the fused merge, then the merge kernel unless fused), their
    grids and their argument lists. ``decode_attention`` launches them through Numba's
    dispatcher; oscar's launch plans (oscar/_launch.py) pack the same argument lists once and
    launch them through the driver.

    ``page_size`` > 0 (with ``block_table``): the paged specialization of the split kernel
    (:func:`decode_attention`); its argument list ends with ``block_table`` (``SPLIT_ARGS +
    ("block_table",)``). The merge kernel is the same.
    """
    batch, nq, q_len, d = (int(s) for s in q.shape)
    nkv = int(k_codes.shape[1])
    out_dtype = "float32" if _dtype_name(out) == "float32" else q_dtype
    skey = _split_key(config, d, nq // nkv, q_len, q_dtype, res_dtype, out_dtype,
                      page_size=page_size)
    rows, fuse = launch_shape(skey, batch, nkv, quantized_len, residual_len, num_splits)
    split = _split_kernel(*_with_fused(skey, fuse))
    scale32 = np.float32(scale)
    ql, rl, ns = np.int32(quantized_len), np.int32(residual_len), np.int32(num_splits)
    ws_max, ws_sum, ws_acc = workspace["split_max"], workspace["split_sum"], workspace["split_acc"]
    grid_x = batch * nkv * row_blocks(skey)  # x = (b H + kvh) RB + row block
    launches = [(split, (grid_x, rows + int(num_splits)), NUM_THREADS,
                 (q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, ws_max, ws_sum,
                  ws_acc, scale32, ql, rl, ns, np.int32(rows), out, lse, workspace["split_count"],
                  np.int32(1 if fuse else 0), lengths), SPLIT_ARGS)]
    if page_size:
        kernel, grid, block, args, names = launches[0]
        launches[0] = (kernel, grid, block, args + (block_table,), names + ("block_table",))
    if not fuse:
        merge = _merge_kernel(*_merge_key(config, d, q_dtype, res_dtype, out_dtype))
        launches.append((merge, batch * nq * q_len, NUM_THREADS,
                         (q, k_res, v_res, ws_max, ws_sum, ws_acc, out, lse, scale32, ql, rl, ns,
                          np.int32(1 if rows else 0), lengths), MERGE_ARGS))
    return launches


def decode_kernels(config, head_dim, gqa, q_len, q_dtype, res_dtype, out_dtype=None,
                   page_size=0):
    """Compile (or load from the kernel cache) every kernel a decode loop of this query shape
    can launch: the split kernel with and without the fused merge (which one runs changes with
    the cache length and the residual tokens, :func:`launch_shape`) and the merge kernel.
    Returns them, for warm-up. ``page_size`` > 0: the paged split kernels."""
    skey = _split_key(config, head_dim, gqa, q_len, q_dtype, res_dtype, out_dtype,
                      page_size=page_size)
    kernels = [_split_kernel(*_with_fused(skey, False))]
    if FUSED_MERGE and _uses_v3(skey):
        kernels.append(_split_kernel(*_with_fused(skey, True)))
    out = q_dtype if out_dtype is None else out_dtype
    kernels.append(_merge_kernel(*_merge_key(config, head_dim, q_dtype, res_dtype, out)))
    _blocks_per_sm(skey, SPLIT_VERSION, V3_MAX_REGISTERS,
                   _row_limits())  # the unfused key, as plan_splits
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
              "num_splits", "residual_rows", "out", "lse", "split_count", "fused", "lengths")
MERGE_ARGS = ("q", "k_res", "v_res", "split_max", "split_sum", "split_acc", "out", "lse", "scale",
              "quantized_len", "residual_len", "num_splits", "residual_slot", "lengths")


def _check_query_and_heads(q, k_codes, config, q_dtype, res_dtype):
    """The checks both argument checkers start with: the dtype names, q's rank and head_dim, and
    the GQA ratio. Returns ``(batch, num_q_heads, q_len, head_dim, num_kv_heads)``."""
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
    return batch, nq, q_len, d, nkv


def _check_arguments(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse,
                     workspace, config, quantized_len, residual_len, q_dtype, res_dtype,
                     num_splits, lengths, block_table=None, page_size=0):
    """ValueError / TypeError naming the first argument that breaks the contract."""
    if page_size or block_table is not None:
        return _check_paged(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out,
                            lse, workspace, config, quantized_len, residual_len, q_dtype,
                            res_dtype, num_splits, lengths, block_table, page_size)
    batch, nq, q_len, d, nkv = _check_query_and_heads(q, k_codes, config, q_dtype, res_dtype)
    cap = int(v_codes.shape[2]) if len(v_codes.shape) == 4 else -1
    if cap < 0 or cap % config.key_group_size:
        raise ValueError(f"v_codes: expected [batch, num_kv_heads, capacity, words] with capacity "
                         f"a multiple of {config.key_group_size}, got {tuple(v_codes.shape)}")
    r_len = config.residual_length
    quantized_len, residual_len, num_splits = int(quantized_len), int(residual_len), int(num_splits)
    if not 0 <= quantized_len <= cap or quantized_len % config.key_group_size:
        raise ValueError(f"quantized_len: expected a multiple of {config.key_group_size} in "
                         f"[0, {cap}], got {quantized_len}")
    _check_step_lengths(quantized_len, residual_len, q_len, num_splits, r_len)
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
    _check_rest(q, k_res, v_res, out, lse, workspace, config, q_dtype, res_dtype, num_splits,
                lengths, nkv)


def _check_rest(q, k_res, v_res, out, lse, workspace, config, q_dtype, res_dtype, num_splits,
                lengths, nkv):
    """The checks of :func:`_check_arguments` after the packed arrays (shared with the paged
    cache's, :func:`_check_paged`)."""
    batch, nq, q_len, d = (int(s) for s in q.shape)
    r_len = config.residual_length
    _expect("k_res", k_res, (batch, nkv, r_len, d), Q_DTYPES[res_dtype])
    _expect("v_res", v_res, (batch, nkv, r_len, d), Q_DTYPES[res_dtype])
    out_ok = ("float32", np.dtype(Q_DTYPES[q_dtype]).name)
    if _dtype_name(out) not in out_ok:
        raise TypeError(f"out: expected dtype float32 or q's dtype ({q_dtype}, stored as "
                        f"{out_ok[1]}), got {_dtype_name(out)}")
    _expect("out", out, (batch, nq, q_len, d), _dtype_name(out))
    _expect("lse", lse, (batch, nq, q_len), np.float32)
    _expect("lengths", lengths, (batch, LENGTH_COLUMNS), np.int32)
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


def paged_unsupported(config, head_dim, gqa, q_len, page_size):
    """None when the paged split kernel (v3's paged specialization, :func:`decode_attention`
    with a block table) runs for this configuration, else the reason (a string): v3 must run
    (``SPLIT_VERSION == 3`` and ``attention_mma.unsupported`` is None: rows = gqa * q_len <=
    32, float16 params, ...) and ``page_size`` must be a positive multiple of 32 and of the key
    group. The residual tokens and the merge need nothing more: they are the contiguous
    kernels' (residual blocks or the merge kernel, fused or not)."""
    if SPLIT_VERSION != 3:
        return f"SPLIT_VERSION is {SPLIT_VERSION} (the paged kernel is v3's)"
    why = _split_v3.unsupported(config.key_bits, config.value_bits, config.value_group_size,
                                head_dim, gqa * q_len, config.param_dtype)
    if why is not None:
        return f"v3 does not run: {why}"
    p = int(page_size)
    if p <= 0 or p % TILE_TOKENS or p % config.key_group_size:
        return (f"page_size {page_size} is not a positive multiple of {TILE_TOKENS} and of the "
                f"key group ({config.key_group_size})")
    return None


def _host_int32(x):
    """A NumPy copy of a small int32 device array (torch tensor, Numba device array or, in the
    simulator, a NumPy array)."""
    if hasattr(x, "copy_to_host"):
        return np.asarray(x.copy_to_host())
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _strides(x):
    """Byte strides of a torch tensor, Numba device array or NumPy array."""
    f = getattr(x, "stride", None)
    if callable(f):  # torch: element strides
        return tuple(int(v) * x.element_size() for v in f())
    return tuple(int(v) for v in x.strides)


def _check_paged(q, k_codes, k_params, v_codes, v_params, norms, k_res, v_res, out, lse,
                 workspace, config, quantized_len, residual_len, q_dtype, res_dtype, num_splits,
                 lengths, block_table, page_size):
    """:func:`_check_arguments` of the paged cache: the packed arrays are a pool's section views
    ``[num_pages, ...]`` (strided by one page stride, inner axes C-contiguous), the block table
    int32 ``[batch, max_blocks]`` whose entries the rows read are page ids in range (checked on
    the host)."""
    batch, nq, q_len, d, nkv = _check_query_and_heads(q, k_codes, config, q_dtype, res_dtype)
    if not isinstance(page_size, (int, np.integer)) or isinstance(page_size, bool):
        raise TypeError(f"page_size: expected an int, got {type(page_size).__name__}")
    why = paged_unsupported(config, d, nq // nkv, q_len, page_size)
    if why is not None:
        raise ValueError(f"page_size / block_table: no paged decode kernel for this "
                         f"configuration: {why}")
    p = int(page_size)
    if block_table is None:
        raise ValueError("block_table: expected an int32 [batch, max_blocks] device array with "
                         "page_size, got None")
    if len(block_table.shape) != 2:
        raise ValueError(f"block_table: expected an int32 [batch, max_blocks] array, got shape "
                         f"{tuple(block_table.shape)}")
    _expect("block_table", block_table, (batch, int(block_table.shape[1])), np.int32)
    max_blocks = int(block_table.shape[1])
    quantized_len, residual_len, num_splits = int(quantized_len), int(residual_len), int(num_splits)
    if not 0 <= quantized_len <= max_blocks * p or quantized_len % config.key_group_size:
        raise ValueError(f"quantized_len: expected a multiple of {config.key_group_size} in "
                         f"[0, max_blocks * page_size = {max_blocks * p}], got {quantized_len}")
    r_len = config.residual_length
    _check_step_lengths(quantized_len, residual_len, q_len, num_splits, r_len)
    num_pages = int(k_codes.shape[0])
    pd = PARAM_DTYPES[config.param_dtype]
    _expect("q", q, (batch, nq, q_len, d), Q_DTYPES[q_dtype])
    sections = [("k_codes", k_codes, (nkv, p // 32, d * config.key_bits // 32, 32), np.uint32),
                ("k_params", k_params, (nkv, p // config.key_group_size, d, 2), pd),
                ("v_codes", v_codes, (nkv, p, d * config.value_bits // 32), np.uint32),
                ("v_params", v_params, (nkv, p, d // config.value_group_size, 2), pd)]
    if config.scale_tokens:
        s = nkv if config.norm_scope == "head" else 1
        sections.append(("norms", norms, (s, p), np.float32))
    elif len(norms.shape) != 3:
        raise ValueError(f"norms: expected a 3-D array (any [1, 1, 1] without scale_tokens), "
                         f"got shape {tuple(norms.shape)}")
    else:
        _expect("norms", norms, tuple(int(x) for x in norms.shape), np.float32)
    page_stride = None
    for name, x, inner, dt in sections:
        _expect_strided(name, x, (num_pages,) + inner, dt)
        st = _strides(x)[0]
        if page_stride is None:
            page_stride = st
        elif st != page_stride:
            raise ValueError(f"{name}: expected the page stride of k_codes ({page_stride} "
                             f"bytes; the sections of one pool), got {st}")
        ptr = device_pointer(x)
        if ptr % 16:
            raise ValueError(f"{name}: expected a 16-byte aligned base address, got {ptr:#x}")
    if num_pages > 1 and not (0 < page_stride < 2**31 and page_stride % 16 == 0):
        raise ValueError(f"k_codes: expected a page stride that is a positive multiple of 16 "
                         f"below 2**31 bytes, got {page_stride}")
    _check_rest(q, k_res, v_res, out, lse, workspace, config, q_dtype, res_dtype, num_splits,
                lengths, nkv)
    # the entries the rows read: ceil(min(row's packed tokens, quantized_len) / page_size)
    table = _host_int32(block_table)
    rows_ql = np.minimum(_host_int32(lengths)[:, LEN_QUANTIZED].astype(np.int64), quantized_len)
    need = -(-rows_ql // p)
    for b in range(batch):
        used = table[b, : int(need[b])]
        bad = (used < 0) | (used >= num_pages)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"block_table: expected page ids in [0, {num_pages}) in the "
                             f"{int(need[b])} entries row {b} reads, got {int(used[j])} at "
                             f"[{b}, {j}]")


def _expect_strided(name, x, shape, dtype):
    """:func:`_expect` for a section view of a page pool: the shape and dtype, a device array,
    and C-contiguous axes after the first (the page axis may have any stride)."""
    _expect_array(name, x, shape, dtype)
    st = _strides(x)
    inner, size = [], np.dtype(dtype).itemsize
    for n in reversed(shape[1:]):
        inner.insert(0, size)
        size *= n
    if tuple(st[1:]) != tuple(inner):
        raise ValueError(f"{name}: expected C-contiguous axes after the page axis (strides "
                         f"{tuple(inner)}), got strides {tuple(st)}")
