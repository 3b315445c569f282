"""Inline-PTX device intrinsics for the tensor-core decode kernel (``attention_mma``) and the
quantize kernel. GPU only.

Numba has no tensor-core, asynchronous-copy, vector-shared-load or packed-half API; each helper
here is one PTX instruction (or a short fixed sequence) emitted through
``numba.cuda.extending.intrinsic`` and ``llvmlite.ir.InlineAsm``. They cannot run in the CUDA
simulator; ``ptx_sim.py`` has a Python version of each with the same semantics, so the kernel
that uses them also runs in CPU CI. The real instructions are covered by the GPU tests and by
the sm_90 PTX compile test.

Values are raw 32-bit registers: a ``uint32`` holding two float16 (low half = element 0) is a
"f16x2" in PTX terms.

* ``mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)``: ``mma.sync.aligned.m16n8k16.row.col``
  with float16 A and B and float32 accumulators; returns the 4 accumulators. Warp-collective.
* ``prmt(a, b, sel)``: byte permute of the 8 bytes ``b:a``.
* ``ex2(x)``: ``ex2.approx.ftz.f32`` (2**x; the softmax works in log2 units).
* ``pack_f16x2(lo, hi)``: two float32 to a f16x2, round to nearest even. ``hmul2(a, b)``:
  packed float16 multiply (``.rn``). ``f16x2_lo(x)``, ``f16x2_hi(x)``: one half of a f16x2 as
  float32 (exact).
* ``global_address(a, idx)`` (int64) / ``shared_address(a, idx)`` (int32, the .shared window):
  the address of element ``a[idx]`` (``idx`` a tuple, one index per dimension), formed once so
  that the hot loop works with 32-bit offsets instead of Numba's int64 index arithmetic.
* ``lds4 / lds2 / lds1 / lds4f / lds1f(base, off)``: 16/8/4-byte loads (uint32 or float32 lanes)
  from .shared address ``base + off``; ``sts1f(base, off, value)``: a 4-byte store;
  ``sts2(base, off, w0, w1)``: an 8-byte store; ``sts4(base, off, w0, w1, w2, w3)``: a 16-byte
  store. The add is 32-bit inside the intrinsic, so ptxas folds a constant offset into the
  instruction.
* ``rcp_approx(x)``: ``rcp.approx.ftz.f32`` (the seed of the quantize kernel's exact
  reciprocals).
* ``ldg4(addr)``: a 16-byte global load (4 uint32) through the read-only path (the quantize
  kernel's input rows).
* ``ldcg4(addr)``, ``ldcg1f(addr)``: 16-byte / float32 global loads cached in L2 only
  (``ld.global.cg``): the fused merge reads partials other blocks of the same launch wrote.
* ``ldg1s(addr)``: an int32 global load through the read-only path (``ld.global.nc.s32``): the
  paged v3 kernel's block-table entries.
* ``redux_max_u32(x)``: ``redux.sync.max.u32`` over the full warp (one instruction instead of
  five shuffles and maxima). Warp-collective.
* ``bar_sync(ident, count)``: ``bar.sync ident, count`` -- a named barrier of ``count`` threads
  (a multiple of 32; barrier 0 is ``syncthreads``'): the warps of one token lane of the v3
  kernel's row-group mode meet there without waiting for the other lanes. Orders shared memory
  among its threads like ``syncthreads``.
* ``cp_async16_bo(base, off, src)``, ``cp_async_commit()``, ``cp_async_wait0/1/2/3()``: 16-byte
  asynchronous global -> shared copies (``cp.async.cg``) and their group waits; a
  ``syncwarp``/``syncthreads`` after the wait makes the other lanes' copies visible.

Alignment (16 bytes for the 16-byte forms, 8 for ``lds2`` / ``sts2``) is the caller's
contract, derived from the packed layout and the shared-array declarations. The shared-memory
and cp.async asm statements are side-effecting and clobber memory, so LLVM keeps them in program
order with respect to each other, to plain loads and stores, and to barriers.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import cuda
from numba import types
from numba.cuda import cgutils, libdevice
from numba.cuda.api_util import normalize_indices
from numba.cuda.extending import intrinsic

_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_U64 = ir.IntType(64)


def _element_pointer(context, builder, aryty, idxty, ary, idx):
    idxty, idx = normalize_indices(context, builder, idxty, idx, aryty, aryty.dtype)
    arr = context.make_array(aryty)(context, builder, value=ary)
    return cgutils.get_item_pointer(context, builder, aryty, arr, idx, wraparound=False)


def _simple(name, text, argtypes, rettype, constraints):
    """Intrinsic of one inline-asm statement over 1 to 3 scalar arguments (cast to ``argtypes``).

    Explicit arities: a ``*args`` typing function would make Numba treat the call as star-args.
    """

    def typer(*args):
        def codegen(context, builder, sig, llargs):
            vals = [context.cast(builder, v, t, want)
                    for v, t, want in zip(llargs, sig.args, argtypes)]
            fnty = ir.FunctionType(context.get_value_type(rettype),
                                   [context.get_value_type(t) for t in argtypes])
            return builder.call(ir.InlineAsm(fnty, text, constraints), vals)

        return rettype(*args), codegen

    impls = {
        1: lambda typingctx, a: typer(a),
        2: lambda typingctx, a, b: typer(a, b),
        3: lambda typingctx, a, b, c: typer(a, b, c),
    }
    impl = impls[len(argtypes)]
    impl.__name__ = name
    return intrinsic(impl)


_U, _F = types.uint32, types.float32

prmt = _simple("prmt", "prmt.b32 $0, $1, $2, $3;", (_U, _U, _U), _U, "=r,r,r,r")
# cvt.rn.f16x2.f32 d, a, b puts a in the upper half: pass (hi, lo) in that order.
pack_f16x2 = _simple("pack_f16x2", "cvt.rn.f16x2.f32 $0, $2, $1;", (_F, _F), _U, "=r,f,f")
hmul2 = _simple("hmul2", "mul.rn.f16x2 $0, $1, $2;", (_U, _U), _U, "=r,r,r")
#: 2**x (``ex2.approx.ftz``: relative error about 2**-22, ex2(-inf) = +0, NaN stays NaN)
ex2 = _simple("ex2", "ex2.approx.ftz.f32 $0, $1;", (_F,), _F, "=f,f")
f16x2_lo = _simple("f16x2_lo", "{.reg .f16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, l;}",
                   (_U,), _F, "=f,r")
f16x2_hi = _simple("f16x2_hi", "{.reg .f16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, h;}",
                   (_U,), _F, "=f,r")

_MMA_TEXT = ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
             "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")


@intrinsic
def mma_f16(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """D = A (16x16 f16, row) * B (16x8 f16, col) + C (16x8 f32); 4 accumulators per thread."""
    ret = types.UniTuple(types.float32, 4)
    want = (_U,) * 6 + (_F,) * 4

    def codegen(context, builder, sig, args):
        vals = [context.cast(builder, v, t, w) for v, t, w in zip(args, sig.args, want)]
        rty = ir.LiteralStructType([_F32] * 4)
        fnty = ir.FunctionType(rty, [_I32] * 6 + [_F32] * 4)
        asm = ir.InlineAsm(fnty, _MMA_TEXT, "=f,=f,=f,=f," + ",".join(["r"] * 6 + ["f"] * 4))
        res = builder.call(asm, vals)
        return context.make_tuple(builder, ret, [builder.extract_value(res, i) for i in range(4)])

    return ret(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), codegen


def _asm_statement(name, text):
    def impl(typingctx):
        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}",
                               side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()

        return types.void(), codegen

    impl.__name__ = name
    return intrinsic(impl)


#: close the current group of cp.async copies
cp_async_commit = _asm_statement("cp_async_commit", "cp.async.commit_group;")
#: wait until at most 0 / 1 / 2 / 3 committed groups of this thread are still in flight
cp_async_wait0 = _asm_statement("cp_async_wait0", "cp.async.wait_group 0;")
cp_async_wait1 = _asm_statement("cp_async_wait1", "cp.async.wait_group 1;")
cp_async_wait2 = _asm_statement("cp_async_wait2", "cp.async.wait_group 2;")
cp_async_wait3 = _asm_statement("cp_async_wait3", "cp.async.wait_group 3;")
#: release / acquire fence at GPU scope (lighter than ``membar.gl``, i.e. ``fence.sc.gpu``, of
#: ``cuda.threadfence``): with a barrier and one relaxed atomic, the arrival counter pattern of
#: CUTLASS's generic barrier (writers: ``bar.sync``, then one thread fences and adds; the last
#: arrival: fences after its add, then ``bar.sync``)
fence_acq_rel_gpu = _asm_statement("fence_acq_rel_gpu", "fence.acq_rel.gpu;")


@intrinsic
def bar_sync(typingctx, ident, count):
    """``bar.sync ident, count``: named barrier ``ident`` (1..15) of ``count`` threads."""
    want = (types.int32, types.int32)

    def codegen(context, builder, sig, args):
        vals = [context.cast(builder, v, t, w) for v, t, w in zip(args, sig.args, want)]
        asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_I32, _I32]), "bar.sync $0, $1;",
                           "r,r,~{memory}", side_effect=True)
        builder.call(asm, vals)
        return context.get_dummy_value()

    return types.void(ident, count), codegen


# --- raw addresses: computed once per tile, offset in 32-bit arithmetic ---------------------


def _address(kind):
    def impl(typingctx, array, index):
        if not isinstance(array, types.Array):
            return None
        # signed results: Numba types uint64 + int64 as float64
        ret = types.int64 if kind == "generic" else types.int32

        def codegen(context, builder, sig, args):
            aryty, idxty = sig.args
            ptr = _element_pointer(context, builder, aryty, idxty, args[0], args[1])
            if kind == "generic":
                return builder.ptrtoint(ptr, ir.IntType(64))
            asm = ir.InlineAsm(ir.FunctionType(_I32, [ptr.type]),
                               "{.reg .u64 a; cvta.to.shared.u64 a, $1; cvt.u32.u64 $0, a;}",
                               "=r,l")
            return builder.call(asm, [ptr])

        return ret(array, index), codegen

    impl.__name__ = f"{kind}_address"
    return intrinsic(impl)


#: generic (global) address of ``a[idx]`` as int64
global_address = _address("generic")
#: .shared address of ``a[idx]`` (a shared array) as int32
shared_address = _address("shared")

# --- (base, offset) forms: the add is 32-bit inside the intrinsic, so ptxas folds a constant
# offset into the instruction's immediate ---------------------------------------------------


def _lds_bo(count, nbtype, llty, ptx_type, constraint):
    width = {1: "", 2: ".v2", 4: ".v4"}[count]
    outs = ",".join(f"${i}" for i in range(count))
    text = (f"ld.shared{width}.{ptx_type} {{{outs}}}, [${count}];" if count > 1
            else f"ld.shared.{ptx_type} $0, [$1];")
    cons = ",".join([f"={constraint}"] * count + ["r", "~{memory}"])

    def impl(typingctx, base, off):
        ret = nbtype if count == 1 else types.UniTuple(nbtype, count)

        def codegen(context, builder, sig, args):
            b = context.cast(builder, args[0], sig.args[0], types.uint32)
            o = context.cast(builder, args[1], sig.args[1], types.uint32)
            rty = llty if count == 1 else ir.LiteralStructType([llty] * count)
            asm = ir.InlineAsm(ir.FunctionType(rty, [_I32]), text, cons, side_effect=True)
            res = builder.call(asm, [builder.add(b, o)])
            if count == 1:
                return res
            return context.make_tuple(builder, ret,
                                      [builder.extract_value(res, i) for i in range(count)])

        return ret(base, off), codegen

    impl.__name__ = f"lds{count}_{ptx_type}_bo"
    return intrinsic(impl)


#: ``lds*(base, off)``: load from .shared address ``base + off`` (both int, added in 32 bits)
lds4 = _lds_bo(4, types.uint32, _I32, "u32", "r")
lds2 = _lds_bo(2, types.uint32, _I32, "u32", "r")
lds1 = _lds_bo(1, types.uint32, _I32, "u32", "r")
lds4f = _lds_bo(4, types.float32, _F32, "f32", "f")
lds1f = _lds_bo(1, types.float32, _F32, "f32", "f")


def _sts_bo(nbtype, llty, ptx_type, constraint):
    def impl(typingctx, base, off, value):
        def codegen(context, builder, sig, args):
            b = context.cast(builder, args[0], sig.args[0], types.uint32)
            o = context.cast(builder, args[1], sig.args[1], types.uint32)
            v = context.cast(builder, args[2], sig.args[2], nbtype)
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_I32, llty]),
                               f"st.shared.{ptx_type} [$0], $1;", f"r,{constraint},~{{memory}}",
                               side_effect=True)
            builder.call(asm, [builder.add(b, o), v])
            return context.get_dummy_value()

        return types.void(base, off, value), codegen

    impl.__name__ = f"sts_{ptx_type}_bo"
    return intrinsic(impl)


#: ``sts1f(base, off, value)``: store a float32 to .shared address ``base + off``
sts1f = _sts_bo(types.float32, _F32, "f32", "f")


@intrinsic
def sts2(typingctx, base, off, v0, v1):
    """``st.shared.v2.u32``: two uint32 to the 8-byte aligned .shared address ``base + off``."""

    def codegen(context, builder, sig, args):
        b = context.cast(builder, args[0], sig.args[0], types.uint32)
        o = context.cast(builder, args[1], sig.args[1], types.uint32)
        w0 = context.cast(builder, args[2], sig.args[2], types.uint32)
        w1 = context.cast(builder, args[3], sig.args[3], types.uint32)
        asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_I32, _I32, _I32]),
                           "st.shared.v2.u32 [$0], {$1, $2};", "r,r,r,~{memory}",
                           side_effect=True)
        builder.call(asm, [builder.add(b, o), w0, w1])
        return context.get_dummy_value()

    return types.void(base, off, v0, v1), codegen


@cuda.jit(device=True)
def float_as_uint(x):
    """The bits of a float32 as uint32."""
    return np.uint32(libdevice.float_as_int(x))


@cuda.jit(device=True)
def uint_as_float(u):
    """uint32 bits as a float32."""
    return libdevice.int_as_float(np.int32(u))


@intrinsic
def sts4(typingctx, base, off, v0, v1, v2, v3):
    """``st.shared.v4.u32``: four uint32 to the 16-byte aligned .shared address ``base + off``."""

    def codegen(context, builder, sig, args):
        b = context.cast(builder, args[0], sig.args[0], types.uint32)
        o = context.cast(builder, args[1], sig.args[1], types.uint32)
        ws = [context.cast(builder, args[i], sig.args[i], types.uint32) for i in range(2, 6)]
        asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_I32] * 5),
                           "st.shared.v4.u32 [$0], {$1, $2, $3, $4};", "r,r,r,r,r,~{memory}",
                           side_effect=True)
        builder.call(asm, [builder.add(b, o)] + ws)
        return context.get_dummy_value()

    return types.void(base, off, v0, v1, v2, v3), codegen


@intrinsic
def rcp_approx(typingctx, x):
    """``rcp.approx.ftz.f32``: 1/x to about 1 ulp (a seed for Newton steps; 0 and subnormal
    inputs give inf)."""

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        asm = ir.InlineAsm(ir.FunctionType(_F32, [_F32]), "rcp.approx.ftz.f32 $0, $1;", "=f,f")
        return builder.call(asm, [v])

    return types.float32(x), codegen


def _ld_global_v4(qualifier, doc):
    """A 16-byte global load ``ld.global.<qualifier>.v4.u32`` of the 16-byte aligned address
    ``addr`` (int64, from :func:`global_address`), as an intrinsic returning 4 uint32."""

    def ld(typingctx, addr):
        def codegen(context, builder, sig, args):
            a = context.cast(builder, args[0], sig.args[0], types.uint64)
            rty = ir.LiteralStructType([_I32] * 4)
            asm = ir.InlineAsm(ir.FunctionType(rty, [_U64]),
                               f"ld.global.{qualifier}.v4.u32 {{$0, $1, $2, $3}}, [$4];",
                               "=r,=r,=r,=r,l", side_effect=True)
            res = builder.call(asm, [a])
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_value(res, i) for i in range(4)])

        return types.UniTuple(types.uint32, 4)(addr), codegen

    ld.__doc__ = doc
    ld.__name__ = ld.__qualname__ = f"ld_global_{qualifier}_v4"
    return intrinsic(ld)


#: ``ld.global.nc.v4.u32``: through the read-only data path (data no block of the kernel writes).
ldg4 = _ld_global_v4("nc", "16 bytes through the read-only data path.")
#: ``ld.global.cg.v4.u32``: cached in L2 only, so data that other blocks of the same kernel wrote
#: (after their fence) is seen, never a stale L1 line.
ldcg4 = _ld_global_v4("cg", "16 bytes cached in L2 only.")


@intrinsic
def ldcg1f(typingctx, addr):
    """``ld.global.cg.f32``: one float32 from global address ``addr``, L2 only (as ``ldcg4``)."""

    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], types.uint64)
        asm = ir.InlineAsm(ir.FunctionType(_F32, [_U64]), "ld.global.cg.f32 $0, [$1];", "=f,l",
                           side_effect=True)
        return builder.call(asm, [a])

    return types.float32(addr), codegen


@intrinsic
def ldg1s(typingctx, addr):
    """``ld.global.nc.s32``: one int32 from global address ``addr`` through the read-only path
    (the paged v3 kernel's block-table entries: data no kernel of the launch writes). Not a side
    effect, so the compiler may hoist or merge it like an ordinary load of constant data."""

    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], types.uint64)
        asm = ir.InlineAsm(ir.FunctionType(_I32, [_U64]), "ld.global.nc.s32 $0, [$1];", "=r,l")
        return builder.call(asm, [a])

    return types.int32(addr), codegen


@intrinsic
def cp_async16_bo(typingctx, base, off, src):
    """``cp.async.cg.shared.global`` of 16 bytes to .shared ``base + off`` from global ``src``."""

    def codegen(context, builder, sig, args):
        b = context.cast(builder, args[0], sig.args[0], types.uint32)
        o = context.cast(builder, args[1], sig.args[1], types.uint32)
        s_ = context.cast(builder, args[2], sig.args[2], types.uint64)
        asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_I32, _U64]),
                           "cp.async.cg.shared.global [$0], [$1], 16;", "r,l,~{memory}",
                           side_effect=True)
        builder.call(asm, [builder.add(b, o), s_])
        return context.get_dummy_value()

    return types.void(base, off, src), codegen


@intrinsic
def redux_max_u32(typingctx, x):
    """``redux.sync.max.u32`` over all 32 lanes: the largest ``x`` of the warp, in every lane.
    Every lane must call it (warp-collective, like a shuffle)."""

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint32)
        asm = ir.InlineAsm(ir.FunctionType(_I32, [_I32]),
                           "redux.sync.max.u32 $0, $1, 0xffffffff;", "=r,r", side_effect=True)
        return builder.call(asm, [v])

    return types.uint32(x), codegen
