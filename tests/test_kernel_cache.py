"""The persistent kernel cache (kernels_numba/kernel_cache.py) and the launch-plan guards (CPU).

The GPU side (a fresh process loads what another compiled; plan launches equal dispatcher
launches) is in tests/test_gpu_runtime.py. Here: where the cache lives, what changes a key (and
that a key is the same in two processes), the entry format (atomic writes under two concurrent
writer processes, truncated/corrupt entries detected, discarded and recompiled), an unwritable
directory degrading to in-memory compilation with one warning, and plans refusing to run where
they cannot (simulator, OSCAR_LAUNCH_PLANS=0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from oscar import _launch
from oscar.kernels_numba import kernel_cache as kc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A private cache directory, the disk cache enabled as on a GPU, the warning re-armed."""
    monkeypatch.setenv("OSCAR_CACHE_DIR", str(tmp_path / "kc"))
    monkeypatch.delenv("OSCAR_KERNEL_CACHE", raising=False)
    monkeypatch.setattr(kc, "SIMULATOR", False)
    monkeypatch.setitem(kc._state, "disabled_reason", None)
    monkeypatch.setitem(kc._state, "warned", False)
    for name in kc.stats:
        monkeypatch.setitem(kc.stats, name, type(kc.stats[name])())
    return tmp_path / "kc"


def test_cache_dir_env_and_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("OSCAR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kc.cache_dir() == str(tmp_path / "xdg" / "oscar" / "kernels")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kc.cache_dir() == str(tmp_path / "home" / ".cache" / "oscar" / "kernels")
    monkeypatch.setenv("OSCAR_CACHE_DIR", str(tmp_path / "mine"))
    assert kc.cache_dir() == str(tmp_path / "mine")


def test_disabled_in_simulator_and_by_env(monkeypatch):
    monkeypatch.setattr(kc, "SIMULATOR", True)
    assert not kc.enabled()
    monkeypatch.setattr(kc, "SIMULATOR", False)
    monkeypatch.setitem(kc._state, "disabled_reason", None)
    monkeypatch.setenv("OSCAR_KERNEL_CACHE", "0")
    assert not kc.enabled()
    monkeypatch.setenv("OSCAR_KERNEL_CACHE", "1")
    assert kc.enabled()


def _closure(value):
    def kernel(x):
        return x + value
    return kernel


def _closure_other_code(value):
    def kernel(x):
        return x * value
    return kernel


def test_key_changes_with_everything_that_changes_the_code(monkeypatch):
    fn = _closure(3)
    base = kc.entry_key("split_v3", (2, 2, 32), "void(float32[:])", {}, fn, (9, 0))
    assert base == kc.entry_key("split_v3", (2, 2, 32), "void(float32[:])", {}, _closure(3),
                                (9, 0)), "same inputs, same key"
    variants = [
        kc.entry_key("merge", (2, 2, 32), "void(float32[:])", {}, fn, (9, 0)),          # name
        kc.entry_key("split_v3", (2, 2, 64), "void(float32[:])", {}, fn, (9, 0)),       # factory key
        kc.entry_key("split_v3", (2, 2, 32), "void(float64[:])", {}, fn, (9, 0)),       # signature
        kc.entry_key("split_v3", (2, 2, 32), "void(float32[:])", {"max_registers": 96}, fn,
                     (9, 0)),                                                           # register cap
        kc.entry_key("split_v3", (2, 2, 32), "void(float32[:])", {}, _closure(4), (9, 0)),  # value
        kc.entry_key("split_v3", (2, 2, 32), "void(float32[:])", {}, _closure_other_code(3),
                     (9, 0)),                                                           # code
        kc.entry_key("split_v3", (2, 2, 32), "void(float32[:])", {}, fn, (10, 0)),      # device
    ]
    assert len(set(variants + [base])) == len(variants) + 1
    monkeypatch.setattr(kc, "_SOURCE_HASH", "another source tree")                      # sources
    assert kc.entry_key("split_v3", (2, 2, 32), "void(float32[:])", {}, fn, (9, 0)) != base
    monkeypatch.setattr(kc, "_versions", lambda: ("0.0", "0.0", (3, 0)))                # versions
    assert kc.entry_key("split_v3", (2, 2, 32), "void(float32[:])", {}, fn, (9, 0)) != base


SWITCH = 1  # a module switch read by a "device function" below


def _device_fn(x):
    return x + SWITCH


class _Dispatcher:  # the shape of a Numba device-function dispatcher: py_func
    py_func = staticmethod(_device_fn)


def _kernel_calling(dev):
    def kernel(x):
        return dev(x)
    return kernel


def test_key_follows_module_switches_into_device_functions(monkeypatch):
    """A module global read by a device function the kernel calls (a switch a test or a
    benchmark flips at run time) is part of the key."""
    fn = _kernel_calling(_Dispatcher())
    before = kc.entry_key("k", (), "void()", {}, fn, (9, 0))
    monkeypatch.setattr(sys.modules[__name__], "SWITCH", 2)
    assert kc.entry_key("k", (), "void()", {}, fn, (9, 0)) != before


KEY_SCRIPT = r"""
import json, sys
from oscar.config import OScaRConfig
from oscar.kernels_numba import attention as A, quantize as Q, kernel_cache as kc
cfg = OScaRConfig()
qkey = Q._quantize_key(cfg, 128, "bfloat16", 8)
fn, sig = Q._quantize_source(*qkey)
skey = A._split_key(cfg, 128, 4, 1, "bfloat16", "bfloat16")
fn2, sig2 = A._build_split(*skey)
out = [kc.entry_key("quantize", qkey, sig, {"max_registers": 128}, fn, (9, 0)),
       kc.entry_key("split_v3", skey, sig2, {"max_registers": 128}, fn2, (9, 0))]
print(json.dumps(out))
"""


def _keys_in_subprocess(*args):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run([sys.executable, "-c", KEY_SCRIPT, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_keys_of_real_kernels_are_the_same_in_two_processes():
    """Nothing process-specific (addresses, uuids) enters the key of the library's kernels."""
    first, second = _keys_in_subprocess(), _keys_in_subprocess()
    assert first == second
    assert first[0] != first[1]


def test_entry_round_trip_and_corruption_detected(tmp_path):
    path = str(tmp_path / "ab" / "entry.okc")
    payload = os.urandom(5000)
    kc.write_entry(path, payload)
    assert kc.read_entry(path) == payload
    assert kc.read_entry(str(tmp_path / "missing.okc")) is None
    data = open(path, "rb").read()
    for bad, why in ((data[:20], "truncated header"), (data[:-1], "payload of"),
                     (data[:-1] + bytes([data[-1] ^ 1]), "checksum"),
                     (b"NOTOSCAR" + data[8:], "bad magic")):
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(ValueError, match=why):
            kc.read_entry(path)
    assert not [n for n in os.listdir(tmp_path / "ab") if n.startswith(".tmp-")]


class _TargetContext:
    refreshed = 0

    def refresh(self):
        self.refreshed += 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "unpicklable"])
def test_corrupt_entry_is_discarded_not_loaded(fresh_state, damage):
    path = kc.entry_path("ab" * 32)
    if damage == "unpicklable":  # a well-formed entry whose payload is not a kernel
        kc.write_entry(path, b"not a pickle at all")
    else:
        kc.write_entry(path, b"x" * 1000)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[:-10] if damage == "truncate" else data[:-1] + b"y")
    cache = kc._DiskCache(path)
    with pytest.warns(RuntimeWarning, match="discarded"):
        assert cache.load_overload(None, _TargetContext()) is None
    assert not os.path.exists(path), "a corrupt entry must be deleted (then recompiled)"
    assert kc.stats["corrupt"] == 1
    assert kc.stats["hits"] == 0


class _FakeKernel:
    def _reduce_states(self):
        return {"cubin": b"\x7fELF" + b"\0" * 64, "name": "fake"}


def test_save_then_load_uses_the_stored_states(fresh_state, monkeypatch):
    path = kc.entry_path("cd" * 32)
    kc._DiskCache(path).save_overload(None, _FakeKernel())
    assert os.path.exists(path)
    from numba.cuda import dispatcher

    rebuilt = {}

    class _Kernel:  # stands in for numba-cuda's (the simulator's dispatcher module has none)
        @classmethod
        def _rebuild(cls, **states):
            rebuilt.update(states)
            return "kernel"

    monkeypatch.setattr(dispatcher, "_Kernel", _Kernel, raising=False)
    ctx = _TargetContext()
    assert kc._DiskCache(path).load_overload(None, ctx) == "kernel"
    assert rebuilt == _FakeKernel()._reduce_states()
    assert ctx.refreshed == 1 and kc.stats["hits"] == 1


def test_unwritable_directory_degrades_with_one_warning(fresh_state, tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("OSCAR_CACHE_DIR", str(blocker / "kernels"))
    with pytest.warns(RuntimeWarning, match="compiled in memory"):
        kc._DiskCache(kc.entry_path("ef" * 32)).save_overload(None, _FakeKernel())
    assert not kc.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure is silent
        kc._disable("again")
        kc._DiskCache(kc.entry_path("ee" * 32)).save_overload(None, _FakeKernel())
    assert kc.info()["disabled_reason"] == "again"


def test_full_disk_degrades(fresh_state, monkeypatch):
    def full(path, payload):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kc, "write_entry", full)
    with pytest.warns(RuntimeWarning, match="No space left"):
        kc._DiskCache(kc.entry_path("12" * 32)).save_overload(None, _FakeKernel())
    assert not kc.enabled()


WRITER = r"""
import os, sys
from oscar.kernels_numba import kernel_cache as kc
path, tag, n = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
for i in range(n):
    kc.write_entry(path, tag * (200000 + i))
"""


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path):
    """Two processes rewrite one entry 60 times each while this process reads it: every read
    sees a complete entry of one writer (atomic rename), never a mix or a truncation."""
    path = str(tmp_path / "99" / "shared.okc")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, tag, "60"], cwd=ROOT)
             for tag in ("A", "B")]
    reads = 0
    while any(p.poll() is None for p in procs):
        payload = kc.read_entry(path)  # raises ValueError on a partial entry
        if payload is not None:
            assert len(set(payload)) == 1 and payload[:1] in (b"A", b"B")
            reads += 1
    assert all(p.returncode == 0 for p in procs)
    payload = kc.read_entry(path)
    assert payload is not None and len(payload) == 200000 + 59
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")]
    assert reads > 0


def test_clear_and_info(fresh_state):
    for h in ("a1", "b2", "c3"):
        kc.write_entry(kc.entry_path(h * 32), b"payload")
    info = kc.info()
    assert info["entries"] == 3 and info["bytes"] > 3 * len(b"payload")
    assert kc.clear() == 3
    assert kc.info()["entries"] == 0


def test_plans_refused_in_the_simulator_and_by_env(monkeypatch):
    monkeypatch.setattr(_launch, "_SUPPORT", None)
    monkeypatch.setenv("OSCAR_LAUNCH_PLANS", "0")
    assert _launch.plan_support() == (False, "OSCAR_LAUNCH_PLANS=0")
    monkeypatch.delenv("OSCAR_LAUNCH_PLANS")
    monkeypatch.setattr(_launch, "SIMULATOR", True)
    assert _launch.plan_support() == (False, "CUDA simulator")
    with pytest.raises(_launch.PlanUnavailable, match="simulator"):
        _launch.PreparedLaunch(object(), 1, 1, ())


def test_plans_refused_for_an_untested_numba_cuda(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(_launch, "_SUPPORT", None)
    monkeypatch.setattr(_launch, "SIMULATOR", False)
    monkeypatch.delenv("OSCAR_LAUNCH_PLANS", raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.99.0")
    ok, why = _launch.plan_support()
    assert not ok and "0.99.0" in why
    monkeypatch.setattr(_launch, "_SUPPORT", None)


def test_packed_sizes_follow_numbas_array_abi():
    from numba.core import types

    sizes = _launch.packed_sizes((types.Array(types.float32, 4, "C"), types.int32,
                                  types.float32, types.Array(types.uint32, 1, "A"),
                                  types.float16, types.boolean))
    assert sizes == [8] * 13 + [4, 4] + [8] * 7 + [2, 1]


def test_initial_capacity_policy():
    """A new CUDA cache reserves max(1/8 of the prompt, 8 windows) beyond the prompt's quantized
    tokens, or exactly max_seq_len (docs/api.md, capacity)."""
    pytest.importorskip("torch")
    try:
        from oscar._cuda_bridge import initial_capacity
    except ImportError as exc:  # numba-cuda's torch bridge unavailable here
        pytest.skip(str(exc))
    assert initial_capacity(0, 128, None) == 8 * 128
    assert initial_capacity(700, 128, None) == 640 + 1024
    assert initial_capacity(32768, 128, None) == 32768 + 4096
    assert initial_capacity(32768 + 100, 128, None) == 32768 + 4096
    assert initial_capacity(32768, 128, 32768) == 32768
    assert initial_capacity(1000, 128, 10) == 896  # never less than the prompt's packed part
    assert initial_capacity(0, 32, 33) == 64


def test_warmup_argument_errors():
    import oscar

    with pytest.raises(TypeError, match="config: expected OScaRConfig"):
        oscar.warmup("int2", num_kv_heads=8, head_dim=128)
    with pytest.raises(ValueError, match="batch_sizes: expected a non-empty tuple"):
        oscar.warmup(num_kv_heads=8, head_dim=128, batch_sizes=())
    with pytest.raises(ValueError, match="q_lens: expected a non-empty tuple"):
        oscar.warmup(num_kv_heads=8, head_dim=128, q_lens=(0,))
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            oscar.warmup(num_kv_heads=8, head_dim=128)
