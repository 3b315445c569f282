"""Device timing helpers shared by the GPU benchmarks and the sweep script.

Every time here is device time from CUDA events around the measured call, with the 50-60 MB L2
flushed before each run (a 256 MiB write), median of many runs after warm-up. Bandwidth counts the
bytes the call must move at least once (packed cache + residual + q + out for oscar; K + V + q +
out in bf16 for SDPA).
"""

from __future__ import annotations

import statistics
import time

import torch

L2_FLUSH_BYTES = 256 << 20  # several times the H100/H200 L2 (50-60 MB)
_flush_buf = None


def flush_l2() -> None:
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    _flush_buf.zero_()


def time_samples(fn, iters: int = 50, warmup: int = 5, flush: bool = True) -> list:
    """Device milliseconds of ``fn()`` in each of ``iters`` runs (after ``warmup`` runs), L2
    flushed before each."""
    for _ in range(warmup):
        fn()
    times = []
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        if flush:
            flush_l2()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_cuda(fn, iters: int = 50, warmup: int = 5, flush: bool = True) -> float:
    """Median device milliseconds of ``fn()`` over ``iters`` runs, L2 flushed before each."""
    return statistics.median(time_samples(fn, iters, warmup, flush))


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read + written."""
    a = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
    b = torch.empty_like(a)
    ms = time_cuda(lambda: b.copy_(a), iters=20, warmup=3, flush=False)
    return 2 * nbytes / (ms * 1e-3) / 1e12


def host_us_per_call(fn, iters: int = 200) -> float:
    """Host microseconds per call of ``fn`` (launch cost; the GPU queue is drained at the end)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e6


def capture_graph(fn):
    """A CUDA graph of one ``fn()`` call (warmed up on a side stream first, as torch requires)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def graph_us_per_replay(fn, iters: int = 200) -> float:
    """Wall microseconds per replay of a CUDA graph that captured one ``fn()`` call (device
    time included: the queue is drained at the end)."""
    g = capture_graph(fn)
    t0 = time.perf_counter()
    for _ in range(iters):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def graph_host_us_per_replay(fn, iters: int = 50) -> float:
    """Host microseconds to enqueue one replay (measured before draining the queue: the host
    cost a decode loop pays per layer when it replays a captured step)."""
    g = capture_graph(fn)
    t0 = time.perf_counter()
    for _ in range(iters):
        g.replay()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e6


def time_graph(fn, iters: int = 50, graphs: int = 3) -> float:
    """Median device milliseconds of a CUDA-graph replay of ``fn`` (L2 flushed): the kernels'
    time without the eager host launch cost. The samples of ``graphs`` separate captures are
    pooled: at batch 1 with residual tokens a step's time varies from replay to replay with the
    order in which its blocks finish (15.4-19.5 us at 4K on the H200), and the median of one
    capture's 50 replays moved by up to 15% from one capture to the next."""
    samples = []
    for _ in range(graphs):
        g = capture_graph(fn)
        samples += time_samples(g.replay, iters=iters)
        del g
    return statistics.median(samples)


def sdpa_bf16(q, k, v):
    """torch SDPA decode baseline with GQA (q [B, Hq, 1, D], k/v [B, H, T, D], bfloat16)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def cache_bytes(cache) -> int:
    """Bytes a decode step must read from an oscar cache (packed arrays + residual)."""
    return cache.nbytes
