"""GPU benchmarks: oscar decode attention and quantize vs torch SDPA bf16, same shapes, same run.

Device time from CUDA events (L2 flushed before each run, median) goes into ``extra_info``
together with bytes moved, TB/s, share of the copy bandwidth measured in this session, and the
speedup over SDPA bf16 (``enable_gqa=True``). pytest-benchmark's own wall-clock columns include
the flush and a synchronize, so read ``extra_info`` (``--benchmark-json``) for device numbers.

    pytest benchmarks/test_bench_decode.py --benchmark-autosave
    pytest benchmarks/test_bench_decode.py --benchmark-compare --benchmark-compare-fail=median:10%
"""

import pytest

torch = pytest.importorskip("torch")

import oscar  # noqa: E402
from cases import DECODE_CASES, HEAD_DIM, NUM_KV_HEADS, decode_inputs  # noqa: E402
from gpu_timing import (capture_graph, copy_bandwidth, flush_l2,  # noqa: E402
                        graph_host_us_per_replay, host_us_per_call, sdpa_bf16, time_cuda)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def copy_tbps():
    return copy_bandwidth()


def _make(batch, seq_len, cfg=None):
    q, k, v = decode_inputs(batch, seq_len, seed=0)
    return q, k, v, oscar.quantize_kv(k, v, cfg or oscar.OScaRConfig())


def _device_time_pedantic(benchmark, fn):
    times = []

    def run():
        flush_l2()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))

    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=3)
    times.sort()
    return times[len(times) // 2]


@pytest.mark.parametrize("batch,seq_len", DECODE_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("bits", [2, 4])
def test_decode_vs_sdpa(benchmark, copy_tbps, batch, seq_len, bits):
    cfg = oscar.OScaRConfig(key_bits=bits, value_bits=bits)
    q, k, v, cache = _make(batch, seq_len, cfg)
    fn = lambda: oscar.decode_attention(q, cache)  # noqa: E731
    graph = capture_graph(fn)  # timed as a decode loop runs it: a replay, no eager launch cost
    ms = _device_time_pedantic(benchmark, graph.replay)
    sdpa_ms = time_cuda(lambda: sdpa_bf16(q, k, v))
    nbytes = cache.nbytes + 2 * q.numel() * q.element_size()
    tbps = nbytes / (ms * 1e-3) / 1e12
    benchmark.extra_info.update(
        device_ms=ms, sdpa_bf16_ms=sdpa_ms, speedup_vs_sdpa=sdpa_ms / ms, bytes=nbytes,
        tbps=tbps, share_of_copy=tbps / copy_tbps, copy_tbps=copy_tbps,
        eager_device_ms=time_cuda(fn), host_us_eager=host_us_per_call(fn),
        host_us_graph_replay=graph_host_us_per_replay(fn))


@pytest.mark.parametrize("tokens", [128, 32768])
def test_quantize_bandwidth(benchmark, copy_tbps, tokens):
    k = torch.randn(1, NUM_KV_HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cache = oscar.quantize_kv(k, v)
    store = cache._store
    fn = lambda: store._quantize_into(k, v, 0)  # noqa: E731
    # timed as a replay, like the decode step: events around an eager call measure its host
    # cost (0.3-0.5 ms of Numba dispatch against 15-190 us of kernel)
    graph = capture_graph(fn)
    ms = _device_time_pedantic(benchmark, graph.replay)
    nbytes = 2 * k.numel() * k.element_size() + cache.nbytes
    tbps = nbytes / (ms * 1e-3) / 1e12
    benchmark.extra_info.update(device_ms=ms, bytes=nbytes, tbps=tbps,
                                share_of_copy=tbps / copy_tbps, copy_tbps=copy_tbps,
                                eager_device_ms=time_cuda(fn), host_us_eager=host_us_per_call(fn))
