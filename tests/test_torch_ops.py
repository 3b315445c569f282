"""oscar's custom ops (oscar/integrations/torch_ops.py) on the CPU reference backend.

``torch.library.opcheck`` runs each op's schema, fake (meta) implementation and AOT dispatch
checks; the ops must equal the plain API calls bit for bit, and a ``torch.compile``d decode step
(the default inductor backend on CPU, no CUDA graphs here: tests/test_graph_step.py has those)
must equal the eager one. Tiny shapes.
"""

import numpy as np
import pytest
import torch

import oscar
from oscar.integrations import torch_ops

CFG = oscar.OScaRConfig(residual_length=32)


def _cache(seed=0, lens=(40, 31)):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, max(lens), 32, generator=g)
    v = torch.randn(2, 2, max(lens), 32, generator=g)
    return oscar.quantize_kv(k, v, CFG, seq_lens=list(lens))


def test_opcheck_decode_and_append():
    cache = _cache()
    q = torch.randn(2, 4, 1, 32)
    lengths = torch_ops.lengths_tensor(cache)
    cid = torch_ops.register(cache)
    torch.library.opcheck(torch.ops.oscar.decode_attention.default, (q, lengths, cid, 0.25))
    k1, v1 = torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32)
    before = cache.seq_lens.copy()
    torch.library.opcheck(torch.ops.oscar.append.default, (k1, v1, lengths, cid),
                          test_utils=("test_schema", "test_faketensor"))
    assert (cache.seq_lens > before).all()  # the op appended (once per opcheck run)
    torch_ops.append(cache, k1, v1)  # the declared mutation: the lengths mirror follows
    lengths = torch_ops.lengths_tensor(cache)
    np.testing.assert_array_equal((lengths[:, 1] + lengths[:, 2]).numpy(), cache.seq_lens)


def test_ops_equal_the_api_and_compile():
    a, b = _cache(1), _cache(1)
    q = torch.randn(2, 4, 1, 32)

    def step(cache, k1, v1, q):
        torch_ops.append(cache, k1, v1)
        return torch_ops.decode_attention(q, cache)

    torch_ops.prepare(a)
    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        k1, v1 = torch.randn(2, 2, 1, 32, generator=g), torch.randn(2, 2, 1, 32, generator=g)
        got = compiled(a, k1, v1, q)
        b.append(k1, v1)
        want = oscar.decode_attention(q, b)
        assert torch.equal(got, want)
    np.testing.assert_array_equal(a.seq_lens, b.seq_lens)


def test_a_dead_cache_id_is_a_clear_error():
    with pytest.raises(ValueError, match="cache_id"):
        torch.ops.oscar.decode_attention(torch.zeros(1, 1, 1, 32),
                                         torch.zeros(1, 4, dtype=torch.int32), 10**9, 1.0)
    with pytest.raises(TypeError, match="cache"):
        torch_ops.register(object())
