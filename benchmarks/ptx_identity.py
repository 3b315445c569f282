"""Is the contiguous v3 split kernel's sm_90 PTX unchanged? (CPU only: NVVM, no GPU.)

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/ptx_identity.py dump DIR    # at each revision
    python benchmarks/ptx_identity.py compare DIR_BEFORE DIR_AFTER

``dump`` writes the PTX of the Llama-3.1-8B default configurations (GQA 4; q_len 1 and 4, the
latter in row groups; plain and with the fused merge) compiled by ``cuda.compile_ptx`` for
sm_90 (and the paged and row-block specializations). ``compare`` normalizes what varies between processes and revisions without changing a
single instruction: the NumbaEnv ``.common`` declarations (Numba emits them in a random order),
Numba's mangled names (they embed a per-process function counter), each replaced by an id in
order of first appearance (``_param_N`` suffixes kept), and register numbers, renamed in order of
first use; then the texts must be equal. Used for issue 27's paged specialization (docs/kernels.md,
"Paged cache").
"""

from __future__ import annotations

import os
import re
import sys

LLAMA = (2, 2, 32, 32, 128, 4, 1, "float16", "bfloat16", True, True, False, "bfloat16", 128)
CASES = {
    "q1": LLAMA + ("bfloat16", True, False),
    "q1_fused": LLAMA + ("bfloat16", True, True),
    "q4_rg": LLAMA[:6] + (4,) + LLAMA[7:] + ("bfloat16", True, False),
    "q4_rg_fused": LLAMA[:6] + (4,) + LLAMA[7:] + ("bfloat16", True, True),
    # the paged specialization (page size 128) and a row-block kernel (64 rows, 2 blocks)
    "q1_paged": LLAMA + ("bfloat16", True, False, 128),
    "q4_rg_paged_fused": LLAMA[:6] + (4,) + LLAMA[7:] + ("bfloat16", True, True, 64),
    "g8q8_row_blocks": LLAMA[:5] + (8, 8) + LLAMA[7:] + ("bfloat16", True, False),
}


def dump(out):
    import numba.cuda.dispatcher as dispatcher

    class _Hopper:
        compute_capability = (9, 0)

    dispatcher.get_current_device = lambda: _Hopper()  # as tests/test_kernels_compile.py
    from numba import cuda

    from oscar.kernels_numba import attention as A

    os.makedirs(out, exist_ok=True)
    for name, key in CASES.items():
        fn, sig = A._build_split(*key)
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
        with open(os.path.join(out, f"{name}.ptx"), "w") as f:
            f.write(ptx)
        print(name, len(ptx.splitlines()), "lines")


def normalize(text):
    text = "\n".join(l for l in text.splitlines()
                     if not l.startswith(".common .global .align 8 .u64 _ZN08NumbaEnv"))
    names = {}

    def name(m):
        return names.setdefault(m.group(1), f"_Z<name{len(names)}>") + (m.group(2) or "")

    text = re.sub(r"(_ZN[0-9A-Za-z_]+?)(_param_\d+)?\b", name, text)
    regs, counts = {}, {}

    def reg(m):
        if m.group(0) not in regs:
            c = counts.get(m.group(1), 0)
            counts[m.group(1)] = c + 1
            regs[m.group(0)] = f"%{m.group(1)}#{c}"
        return regs[m.group(0)]

    return re.sub(r"%(r|rd|f|fd|p|rs|h|hh|b)(\d+)\b", reg, text)


def compare(a_dir, b_dir):
    import difflib

    same = True
    for name in CASES:
        paths = [os.path.join(d, f"{name}.ptx") for d in (a_dir, b_dir)]
        if not all(os.path.exists(p) for p in paths):
            print(f"{name}: not in both directories")
            continue
        a, b = (normalize(open(p).read()) for p in paths)
        if a == b:
            print(f"{name}: IDENTICAL ({len(a.splitlines())} lines)")
            continue
        same = False
        diff = list(difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=1))
        print(f"{name}: DIFFERENT ({len(diff)} diff lines)")
        print("\n".join(diff[:40]))
    return 0 if same else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["dump"]:
        dump(sys.argv[2])
    elif sys.argv[1:2] == ["compare"]:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
