"""Host time of the public API layer above the CUDA store (issue 21), on any machine.

The CUDA store is built over CPU tensors under Numba's CUDA simulator (the fixture of
tests/test_bridge_sim.py) and its decode and append are stubbed, so what is timed is only the
Python of ``oscar.decode_attention`` and ``QuantizedKVCache.append`` (argument checks, the start
column, dispatch): the part that the GPU's launch plans do not cover. Then the store's own
Python on its launch-plan path (the plan lookup, the output allocation, the patched fields),
with the prepared launches replaced by no-ops: what remains of a GPU step's host time is the
driver's launch calls (about 2-4 us each) and torch's CUDA allocator.

    NUMBA_ENABLE_CUDASIM=1 python benchmarks/host_api.py
"""
import cProfile
import os
import pstats
import sys
import time

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import conftest  # noqa: E402,F401  (the simulator's block runner, as in the tests)
import pytest  # noqa: E402
import test_bridge_sim as T  # noqa: E402
import torch  # noqa: E402

import oscar  # noqa: E402

mp = pytest.MonkeyPatch()
br = T.bridge.__wrapped__(mp)
cache = T._store_cache(br, batch=8)
k, v = T._kv(40, 11, batch=8)
cache.append(k, v)
store = cache._store
out = torch.empty(8, 2, 1, T.D)
store.decode_attention = lambda q, scale, lse: out
store.append = lambda k, v: None
q = torch.randn(8, 2, 1, T.D); kn = torch.randn(8, 1, 1, T.D)
N = 20000
t = time.perf_counter()
for _ in range(N): oscar.decode_attention(q, cache)
print("api decode us", (time.perf_counter() - t) / N * 1e6)
t = time.perf_counter()
for _ in range(N): cache.append(kn, kn)
print("api append us", (time.perf_counter() - t) / N * 1e6)

# the store's plan path, launches stubbed (a prepared step of 2 launches, a row plan)
del store.decode_attention, store.append  # the instance stubs: back to the methods


class _Field:
    value = 0


class _Launch:
    def launch(self, stream):
        pass


from oscar import _launch  # noqa: E402

mp.setattr(_launch, "current_stream", lambda index: 0)
mp.setattr(torch.cuda, "current_device", lambda: store.device.index)
store._ensure = lambda n: None
store.plans = True
key = (kn.shape, kn.stride(), kn.stride(), kn.dtype)
store._row_plans[key] = ((_Launch(), _Field(), _Field()), _Launch())
bounds = store._bounds()
store._decisions[(q.shape, q.dtype, bounds[0], bounds[1] > 0)] = (1, 0, False)
store._steps[(q.shape, q.dtype, (1, 0, False), False)] = [(_Launch(),) + (_Field(),) * 6] * 2
store._warmed_shapes.add((q.shape[1], q.shape[2], q.dtype))
t = time.perf_counter()
for _ in range(N):
    store.decode_attention(q, 0.1, False)
print("store decode us (2 launches stubbed)", (time.perf_counter() - t) / N * 1e6)
# (before the appends below: they move the cache's length bounds past the stubbed decision)
if "--profile" in sys.argv:
    prof = cProfile.Profile()
    # the store's plan path (launches stubbed): the API layer above it is timed first
    prof.runcall(lambda: [store.decode_attention(q, 0.1, False) for _ in range(5000)])
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
t = time.perf_counter()
for _ in range(N):
    store.append(kn, kn)
print("store append us (launches stubbed)", (time.perf_counter() - t) / N * 1e6)
