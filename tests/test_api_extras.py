"""reserve(), check() and max_seq_len on the reference backend (the CUDA side: test_gpu_bridge)."""

import numpy as np
import pytest

import oscar


def _kv(t=40, d=32):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, 2, t, d)).astype(np.float32),
            rng.standard_normal((1, 2, t, d)).astype(np.float32))


def test_reserve_and_check_are_noops_on_the_host():
    k, v = _kv()
    cfg = oscar.OScaRConfig(residual_length=32)
    cache = oscar.quantize_kv(k, v, cfg, max_seq_len=1024)
    before = {n: a.copy() for n, a in cache.packed().arrays().items()}
    assert cache.reserve(4096) is cache and cache.check() is cache
    for n, a in cache.packed().arrays().items():
        assert np.array_equal(a, before[n])
    assert cache.seq_len == 40


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_bad_max_seq_len_and_reserve(bad):
    k, v = _kv()
    with pytest.raises(ValueError, match="max_seq_len: expected a non-negative int"):
        oscar.quantize_kv(k, v, max_seq_len=bad)
    cache = oscar.quantize_kv(k, v)
    with pytest.raises(ValueError, match="seq_len: expected a non-negative int"):
        cache.reserve(bad)
