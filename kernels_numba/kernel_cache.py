"""Compile each kernel once per machine: a persistent on-disk cache of compiled Numba kernels.

Every kernel of the library is built by a factory (a closure specialized on compile-time
parameters) and compiled through :func:`jit`. On a GPU, ``jit`` looks the kernel up in a cache
directory before compiling it; a hit loads the stored cubin in milliseconds instead of compiling
for seconds, and a miss compiles and stores it for the next process. In the CUDA simulator
``jit`` is plain ``cuda.jit`` (nothing is compiled there).

Where: ``$OSCAR_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/oscar/kernels``, else
``~/.cache/oscar/kernels``. ``OSCAR_KERNEL_CACHE=0`` turns the disk cache off (every process
compiles in memory, as Numba does by default).

The key of an entry is a SHA-256 over everything that changes the machine code:

* the source of every module of ``oscar.kernels_numba`` (any edit of a kernel file gives new
  keys; conservative: an edit of one kernel recompiles all of them once);
* the kernel's name, its factory key (the specialization: bits, groups, head_dim, dtypes, ...)
  and its signature;
* a fingerprint of the *values* the kernel closes over, followed recursively through the device
  functions it calls: module switches that a test or benchmark flips at run time (a constant
  frozen into the code) change the key;
* the compile options (e.g. ``max_registers``), the numba and numba-cuda versions, the Python
  version and the device's compute capability.

Entries are written to a temporary file in the same directory and renamed into place
(``os.replace``: atomic on POSIX), so concurrent processes never see a partial entry; two
processes compiling the same kernel both write complete entries and the last rename wins. Each
entry carries a header with a magic string, the payload length and the payload's SHA-256: a
truncated or corrupt entry is detected, deleted and recompiled, never loaded. A directory that
cannot be created or written (read-only, full disk) turns the disk cache off for the process
with one warning; kernels are then compiled in memory.

The stored payload is the kernel's own serialization (numba-cuda's ``_Kernel._reduce_states``:
its cubin, PTX and launch metadata), the same state numba-cuda's ``cache=True`` stores. That is
a numba-cuda internal, used only here: a payload that fails to load is treated as corrupt.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import sys
import tempfile
import threading
import time
import types as _pytypes
import warnings

from ._compat import SIMULATOR, cuda, np

#: Bump when the entry format or the keying changes.
FORMAT_VERSION = 1
MAGIC = b"OSCARKC1"
_HEADER = struct.Struct("<8sQ32s")  # magic, payload length, payload sha256
ENTRY_SUFFIX = ".okc"
#: A compile that takes longer than this prints one progress line to stderr.
PROGRESS_AFTER_S = 1.0

_lock = threading.Lock()
_state = {"disabled_reason": None, "warned": False}
#: Counters of this process: loads from disk, compiles (misses), corrupt entries discarded,
#: seconds spent compiling and loading.
stats = {"hits": 0, "misses": 0, "corrupt": 0, "compile_s": 0.0, "load_s": 0.0}


def cache_dir() -> str:
    """The kernel cache directory in force (``OSCAR_CACHE_DIR`` or the XDG default)."""
    env = os.environ.get("OSCAR_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "oscar", "kernels")


def enabled() -> bool:
    """Whether compiled kernels are stored on and loaded from disk in this process."""
    return (not SIMULATOR and os.environ.get("OSCAR_KERNEL_CACHE", "1") != "0"
            and _state["disabled_reason"] is None)


def _disable(reason: str) -> None:
    """Turn the disk cache off for this process, with one warning."""
    with _lock:
        _state["disabled_reason"] = reason
        if _state["warned"]:
            return
        _state["warned"] = True
    warnings.warn(f"oscar: kernel cache directory {cache_dir()!r} unusable ({reason}); kernels "
                  "are compiled in memory for this process (set OSCAR_CACHE_DIR to a writable "
                  "directory, or OSCAR_KERNEL_CACHE=0 to silence this)", RuntimeWarning,
                  stacklevel=3)


# --- keys ---------------------------------------------------------------------------------------

_SOURCE_HASH = None


def source_hash() -> str:
    """SHA-256 over the source files of this package (sorted by name)."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        h = hashlib.sha256()
        here = os.path.dirname(os.path.abspath(__file__))
        for name in sorted(os.listdir(here)):
            if name.endswith(".py"):
                h.update(name.encode())
                with open(os.path.join(here, name), "rb") as f:
                    h.update(f.read())
        _SOURCE_HASH = h.hexdigest()
    return _SOURCE_HASH


def _versions() -> tuple:
    import numba

    try:
        from importlib.metadata import version

        nbc = version("numba-cuda")
    except Exception:  # pragma: no cover - not installed as a distribution
        nbc = "unknown"
    return (numba.__version__, nbc, sys.version_info[:2])


def fingerprint(obj, _seen=None, _depth=0) -> str:
    """A deterministic description of the values a kernel function closes over.

    Followed through closures, referenced module globals, device functions (``py_func`` of a
    Numba dispatcher) and intrinsics (their definition function): constants give their repr,
    functions their code and the fingerprint of what they close over, modules their name.
    Objects whose repr names a memory address contribute only their type (such a repr would
    change the key in every process)."""
    seen = set() if _seen is None else _seen
    if _depth > 40:
        return "<deep>"
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, complex)):
        return repr(obj)
    if isinstance(obj, (np.generic, np.dtype)):
        return f"{type(obj).__name__}:{obj!r}"
    if isinstance(obj, (tuple, list, frozenset, set)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return (f"{type(obj).__name__}(" + ",".join(fingerprint(x, seen, _depth + 1)
                                                      for x in items) + ")")
    if isinstance(obj, dict):
        return "dict(" + ",".join(f"{k!r}:{fingerprint(v, seen, _depth + 1)}"
                                  for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))) + ")"
    if isinstance(obj, _pytypes.ModuleType):
        return f"module:{obj.__name__}"
    ident = id(obj)
    if ident in seen:
        return "<seen>"
    seen.add(ident)
    py_func = getattr(obj, "py_func", None)  # numba dispatcher (device function)
    if isinstance(py_func, _pytypes.FunctionType):
        return "dispatcher:" + fingerprint(py_func, seen, _depth + 1)
    defn = getattr(obj, "_defn", None)  # numba intrinsic
    if isinstance(defn, _pytypes.FunctionType):
        return "intrinsic:" + fingerprint(defn, seen, _depth + 1)
    if isinstance(obj, _pytypes.FunctionType):
        code = obj.__code__
        parts = [obj.__module__ or "", obj.__qualname__, _code_fingerprint(code)]
        for cell in obj.__closure__ or ():
            try:
                parts.append(fingerprint(cell.cell_contents, seen, _depth + 1))
            except ValueError:  # empty cell
                parts.append("<empty>")
        g = obj.__globals__
        for name in sorted(_code_names(code)):
            if name in g:
                parts.append(f"{name}={fingerprint(g[name], seen, _depth + 1)}")
        return "fn(" + "|".join(parts) + ")"
    text = repr(obj)
    if " at 0x" in text or " object at " in text:
        return f"<{type(obj).__module__}.{type(obj).__qualname__}>"
    return f"{type(obj).__qualname__}:{text}"


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, _pytypes.CodeType):
            names |= _code_names(const)
    return names


def _code_fingerprint(code) -> str:
    h = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        h.update((_code_fingerprint(const) if isinstance(const, _pytypes.CodeType)
                  else repr(const)).encode())
    return h.hexdigest()[:16]


def entry_key(name: str, key, sig, options: dict, fn, cc) -> str:
    """The hex SHA-256 that names a kernel's cache entry (see the module docstring)."""
    parts = (FORMAT_VERSION, source_hash(), _versions(), tuple(cc), name, repr(key), str(sig),
             tuple(sorted((k, repr(v)) for k, v in options.items())), fingerprint(fn))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


# --- entries ------------------------------------------------------------------------------------


def entry_path(key_hex: str, directory: str | None = None) -> str:
    return os.path.join(directory or cache_dir(), key_hex[:2], key_hex + ENTRY_SUFFIX)


def write_entry(path: str, payload: bytes) -> None:
    """Write ``payload`` with its header to ``path`` atomically (temporary file + rename)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    header = _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest())
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ENTRY_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_entry(path: str):
    """The payload of the entry at ``path``; None if there is none; raises ``ValueError`` for a
    truncated or corrupt entry (wrong magic, length or checksum)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _HEADER.size:
        raise ValueError(f"truncated header ({len(data)} bytes)")
    magic, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise ValueError(f"payload of {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch")
    return payload


def _discard(path: str) -> None:
    stats["corrupt"] += 1
    try:
        os.unlink(path)
    except OSError:
        pass


class _DiskCache:
    """numba-cuda's cache interface (``load_overload`` / ``save_overload``) over one entry."""

    def __init__(self, path: str):
        self.path = path
        self.cache_path = os.path.dirname(path)

    def load_overload(self, sig, target_context):
        if not enabled():
            return None
        t0 = time.perf_counter()
        try:
            payload = read_entry(self.path)
        except ValueError as exc:
            warnings.warn(f"oscar: discarded a corrupt kernel cache entry {self.path} ({exc}); "
                          "recompiling", RuntimeWarning, stacklevel=2)
            _discard(self.path)
            return None
        except OSError:
            return None
        if payload is None:
            return None
        try:
            from numba.cuda import utils
            from numba.cuda.dispatcher import _Kernel

            states = pickle.loads(payload)
            with utils.numba_target_override():
                target_context.refresh()
                kernel = _Kernel._rebuild(**states)
        except Exception as exc:  # a payload numba cannot rebuild is as bad as a corrupt one
            warnings.warn(f"oscar: discarded an unloadable kernel cache entry {self.path} "
                          f"({type(exc).__name__}: {exc}); recompiling", RuntimeWarning,
                          stacklevel=2)
            _discard(self.path)
            return None
        stats["hits"] += 1
        stats["load_s"] += time.perf_counter() - t0
        return kernel

    def save_overload(self, sig, kernel):
        if not enabled():
            return
        from numba.cuda.serialize import dumps

        try:
            payload = dumps(kernel._reduce_states())
        except Exception as exc:  # pragma: no cover - a kernel numba cannot serialize
            warnings.warn(f"oscar: kernel {self.path} not cached ({type(exc).__name__}: {exc})",
                          RuntimeWarning, stacklevel=2)
            return
        try:
            write_entry(self.path, payload)
        except OSError as exc:
            _disable(f"{type(exc).__name__}: {exc.strerror or exc}")

    def flush(self):
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _Progress:
    """One stderr line when a compile takes longer than PROGRESS_AFTER_S, and its time."""

    def __init__(self, name):
        self.name = name
        self.shown = False
        self.timer = threading.Timer(PROGRESS_AFTER_S, self._show)
        self.timer.daemon = True

    def _show(self):
        self.shown = True
        print(f"oscar: compiling kernel {self.name} (once per machine: cached in {cache_dir()}"
              f"{'' if enabled() else ', disk cache off'}) ...", file=sys.stderr, flush=True)

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.seconds = time.perf_counter() - self.t0
        if self.shown:
            print(f"oscar: compiled kernel {self.name} in {self.seconds:.1f} s", file=sys.stderr,
                  flush=True)


def jit(fn, sig, *, name: str, key=(), **options):
    """``cuda.jit(sig, **options)(fn)``, loaded from / stored to the persistent cache on a GPU.

    ``name`` and ``key`` identify the kernel and its specialization (they enter the entry key
    together with the sources and the closure's values). Returns a Numba dispatcher with exactly
    one compiled overload and compilation disabled, as ``cuda.jit`` with a signature does.
    """
    if SIMULATOR:
        return cuda.jit(sig, **options)(fn)
    from numba.cuda.core import sigutils

    disp = cuda.jit(**options)(fn)  # lazy: nothing compiled yet
    argtypes, _ = sigutils.normalize_signature(sig)
    cc = cuda.get_current_device().compute_capability
    path = entry_path(entry_key(name, key, sig, options, fn, cc))
    disp._cache = _DiskCache(path)  # numba-cuda's compile() consults it: load, else compile+save
    hits = stats["hits"]
    with _Progress(name) as progress:
        disp.compile(argtypes)
    if stats["hits"] == hits:
        stats["misses"] += 1
        stats["compile_s"] += progress.seconds
    disp._specialized = True  # as cuda.jit(sig) leaves it: one overload, launched untyped
    disp.disable_compile()
    # load the module into the current context now, not at the first launch: with CUDA's lazy
    # module loading that first launch (a decode loop's first flush) cost a 13-81 ms stall on
    # an H100 (benchmarks/RESULTS.md, seventeenth session); warm-up is where it belongs
    for overload in disp.overloads.values():
        overload._codelibrary.get_cufunc()
    return disp


def clear(directory: str | None = None) -> int:
    """Delete every entry of the cache directory; returns the number of files removed."""
    directory = directory or cache_dir()
    removed = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if name.endswith(ENTRY_SUFFIX):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def info(directory: str | None = None) -> dict:
    """Where the cache is, whether it is in use, its entries and bytes, and this process's
    counters (``stats``)."""
    directory = directory or cache_dir()
    entries = size = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if name.endswith(ENTRY_SUFFIX):
                entries += 1
                try:
                    size += os.path.getsize(os.path.join(root, name))
                except OSError:
                    pass
    return {"directory": directory, "enabled": enabled(),
            "disabled_reason": _state["disabled_reason"], "entries": entries, "bytes": size,
            **stats}


def launch(kernel, grid, block, stream, *args) -> None:
    """``kernel[grid, block, stream](*args)`` without Numba's low-occupancy warning.

    The library launches small grids on purpose (a decode step of one sequence, a flush of one
    window, tests); numba-cuda warns about every grid under 128 blocks when it configures the
    launch. Only that warning, raised while configuring our own launch, is suppressed; a user's
    own warnings and other Numba warnings are untouched."""
    from numba.core.errors import NumbaPerformanceWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU "
                                "under-utilization", category=NumbaPerformanceWarning)
        configured = kernel[grid, block, stream]
    configured(*args)
