"""Every kernel of oscar.kernels_numba compiles for Hopper (sm_90) -- on a machine without a GPU.

The CUDA simulator does no type checking, so CPU CI would never see a typing error in a kernel.
``cuda.compile_ptx(pyfunc, signature, cc=(9, 0))`` runs NVVM on the CPU (numba-cuda[cu13] ships
it) and catches them. It must run with the simulator *off*, so the compile happens in a
subprocess with ``NUMBA_ENABLE_CUDASIM=0``; the kernels come from the registry
``oscar.kernels_numba.all_kernel_signatures()`` (each kernel module's ``compile_signatures()``:
name, undecorated kernel function, signature, for a representative set of configurations).

The PTX of the kernels that must reproduce the NumPy reference bit for bit (Hadamard, token
norms, dequantize) is also checked for float32 products that ptxas could contract with an add
into an FMA (``mul.f32`` or ``fma.rn.f32``): their products are all ``mul.rn.f32``. (The quantize
kernel's PTX has a few, all inside libdevice's ``fmodf`` used by ``rint_half_even`` on exact ties,
which is exact by construction; it is left out of that check.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: Runs in the subprocess: compile every registered kernel, one JSON line per kernel.
COMPILE_SCRIPT = r"""
import json, re, sys

import numba.cuda.dispatcher as dispatcher


class _Hopper:
    compute_capability = (9, 0)


# Test-only shim: compile_ptx takes cc explicitly, but a kernel that calls a
# @cuda.jit(device=True) function goes through Dispatcher.compile_device, which asks
# get_current_device() for the compute capability -- and that needs a GPU.
dispatcher.get_current_device = lambda: _Hopper()

try:
    from numba.cuda.cudadrv.nvvm import NVVM

    NVVM()
except Exception as exc:  # no CUDA toolkit / NVVM: nothing can be compiled here
    print(json.dumps({"skip": f"NVVM is not available: {type(exc).__name__}: {exc}"}))
    sys.exit(0)

from numba import cuda

from numba.cuda.core import sigutils

from oscar._launch import packed_sizes
from oscar.kernels_numba import all_kernel_signatures

PARAM_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8}


def ptx_param_sizes(ptx):
    # sizes of the .param list of the PTX's one .entry (an aligned .b8 array counts whole)
    head = ptx[ptx.index(".entry"):]
    head = head[head.index("(") + 1:head.index(")")]
    sizes = []
    for decl in head.split(","):
        m = re.search(r"\.param\s+(?:\.align\s+\d+\s+)?\.[a-z]+?(8|16|32|64)\s+\w+(?:\[(\d+)\])?",
                      decl)
        if m:
            sizes.append(PARAM_BYTES[m.group(1)] * int(m.group(2) or 1))
    return sizes


for name, fn, sig in all_kernel_signatures():
    try:
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    except Exception as exc:
        rec = {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:]}
    else:
        rec = {"name": name, "ok": True,
               "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
               "mul_f32": len(re.findall(r"\bmul\.f32\b", ptx)),
               "mul_rn_f32": len(re.findall(r"\bmul\.rn\.f32\b", ptx)),
               "ptx_params": ptx_param_sizes(ptx),
               "plan_params": packed_sizes(sigutils.normalize_signature(sig)[0])}
    print(json.dumps(rec), flush=True)
"""

#: Kernels whose float32 products must all be mul.rn (see the module docstring).
#: (The quantize kernel is checked by its GPU tests instead: its cross-lane butterflies multiply by
#: +-1 and its divisions are FMA sequences by design, both exact.)
EXACT_KERNEL_PREFIXES = ("hadamard.", "dequantize.")
#: Seconds for compiling the whole registry (about 6 minutes of one core on a 2-core CPU in
#: 2026-12; it runs beside the other tests, see start_compile).
COMPILE_TIMEOUT_S = 900

#: The compile subprocess started early by tests/conftest.py (None until then).
_STARTED = None


def start_compile():
    """Start the compile subprocess and return ``(process, stdout file, stderr file)``.

    conftest.py calls this right after collection when this module's tests are selected, so
    that the compile (one core, minutes) runs while the simulator tests (one core: Python
    threads under the GIL) run, instead of after them. Output goes to temporary files (a pipe
    could fill and block the child while nobody reads it).
    """
    global _STARTED
    if _STARTED is None:
        import tempfile

        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([sys.executable, "-c", COMPILE_SCRIPT], env=env, stdout=out,
                                stderr=err, text=True)
        _STARTED = (proc, out, err)
    return _STARTED


@pytest.fixture(scope="module")
def compiled():
    proc, out, err = start_compile()
    try:
        proc.wait(timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"compile subprocess ran past {COMPILE_TIMEOUT_S} s")
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if records and "skip" in records[0]:
        pytest.skip(records[0]["skip"])
    if proc.returncode != 0:
        pytest.fail(f"compile subprocess failed (exit {proc.returncode}):\n{stderr[-5000:]}")
    return records


def test_every_kernel_compiles_for_sm90(compiled):
    failures = [f"{r['name']}: {r['error']}" for r in compiled if not r["ok"]]
    assert not failures, "\n\n".join(failures)


def test_launch_plan_layout_matches_compiled_parameters(compiled):
    """A launch plan (oscar/_launch.py) packs each argument as Numba's calling convention does:
    the sizes of its packed words, in order, equal the kernel's PTX parameter list, for every
    kernel of the registry (the GPU check at plan build compares them with the driver's)."""
    ok = [r for r in compiled if r["ok"]]
    assert ok
    bad = [f"{r['name']}: ptx {r['ptx_params']} != plan {r['plan_params']}"
           for r in ok if r["ptx_params"] != r["plan_params"]]
    assert not bad, "\n".join(bad[:5])
    assert all(len(r["ptx_params"]) > 8 for r in ok)


def test_registry_covers_every_kernel(compiled):
    names = [r["name"] for r in compiled]
    for prefix in ("hadamard.hadamard", "quantize.quantize", "dequantize.dequantize",
                   "paged.copy_tokens", "paged.copy_runs"):
        assert any(n.startswith(prefix) for n in names), f"no {prefix} kernel in the registry"
    assert len(names) == len(set(names)), "duplicate registry names"


def test_exact_kernels_have_no_contractible_products(compiled):
    exact = [r for r in compiled if r["ok"] and r["name"].startswith(EXACT_KERNEL_PREFIXES)]
    assert exact
    bad = [f"{r['name']}: {r['mul_f32']} mul.f32, {r['fma_f32']} fma.rn.f32"
           for r in exact if r["mul_f32"] or r["fma_f32"]]
    assert not bad, "\n".join(bad)
    # each has products (scale, squares, code * scale), so mul.rn must be there
    assert all(r["mul_rn_f32"] > 0 for r in exact)
