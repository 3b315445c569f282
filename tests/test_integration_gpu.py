"""CUDA (Numba backend) side of the cache operations the transformers integration needs, and the
integration on a tiny model on the GPU. All ``gpu``-marked: they skip without a CUDA GPU.

Exact checks: ``select_batch``, ``truncate``, ``copy`` and save/load keep the packed bytes of the
Numba store equal to the reference's (the two backends are bit-exact on packed data).
"""

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import oscar  # noqa: E402
from helpers_reference import host_array  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::FutureWarning")]

INT2 = oscar.OScaRConfig(residual_length=32)
NEVER = oscar.OScaRConfig(residual_length=1024)


_host = host_array


def _same_packed(cuda_cache, ref_cache):
    g, r = cuda_cache.packed().arrays(), ref_cache.packed().arrays()
    assert set(g) == set(r)
    for name in r:
        assert np.array_equal(_host(g[name]), r[name]), name
    for x, y in zip(cuda_cache.residual(), ref_cache.residual()):
        assert np.array_equal(_host(x).astype(np.float32), np.asarray(y, np.float32))


def _kv(batch=3, seq=70, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(batch, 2, seq, 64, generator=g).to(dtype)
    v = torch.randn(batch, 2, seq, 64, generator=g).to(dtype)
    return k, v


def test_select_batch_truncate_copy_cuda():
    k, v = _kv()
    idx = [2, 2, 0, 1]
    c = oscar.quantize_kv(k.cuda(), v.cuda(), INT2).select_batch(idx)
    ref = oscar.quantize_kv(k[idx], v[idx], INT2)
    _same_packed(c, ref)
    d = c.copy()
    d.append(k[idx, :, :30].cuda(), v[idx, :, :30].cuda())  # flushes a window into the copy
    _same_packed(c, ref)  # the original is untouched
    c.truncate(65)
    ref.truncate(65)
    _same_packed(c, ref)
    q = torch.randn(4, 4, 1, 64, dtype=torch.float16)
    got = oscar.decode_attention(q.cuda(), c).float().cpu()
    want = oscar.decode_attention(q, ref).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # tensor-core kernel, fp16 out


def test_deepcopy_cuda_store_is_independent():
    k, v = _kv()
    c = oscar.quantize_kv(k.cuda(), v.cuda(), INT2)
    d = copy.deepcopy(c)
    assert d._store.buf["k_codes"].data_ptr() != c._store.buf["k_codes"].data_ptr()
    d.select_batch([0])
    assert c.batch == 3 and d.batch == 1
    _same_packed(c, oscar.quantize_kv(k, v, INT2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_load_cuda_bit_exact(tmp_path, dtype):
    k, v = _kv(dtype=dtype)
    c = oscar.quantize_kv(k.cuda(), v.cuda(), INT2)
    c.save(tmp_path / "c.st")
    d = oscar.QuantizedKVCache.load(tmp_path / "c.st", device="cuda")
    assert d.backend == "numba" and d.dtype == c.dtype
    ref = oscar.quantize_kv(k, v, INT2)
    _same_packed(d, ref)
    h = oscar.QuantizedKVCache.load(tmp_path / "c.st")  # the same file on the host
    _same_packed(d, h)


def test_decode_attention_start_on_cuda_matches_the_reference():
    # issue 22 item 2 / issue 25: per-row first tokens on the CUDA kernels, host list or device
    # tensor, equal to the reference backend on the same packed bytes
    k, v = _kv()
    c = oscar.quantize_kv(k.cuda(), v.cuda(), INT2)
    h = oscar.quantize_kv(k, v, INT2)
    q = torch.randn(3, 4, 1, 64, dtype=torch.float16)
    for start in ([0, 3, 0], [5, 0, int(k.shape[2]) - 1], torch.tensor([2, 40, 0])):
        want = oscar.decode_attention(q.float(), h, start=start).float()
        dev_start = start.cuda() if isinstance(start, torch.Tensor) else start
        got = oscar.decode_attention(q.cuda(), c, start=dev_start).float().cpu()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    plain = oscar.decode_attention(q.cuda(), c).float().cpu()  # start None after a start
    torch.testing.assert_close(plain, oscar.decode_attention(q.float(), h).float(),
                               atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="start"):
        oscar.decode_attention(q.cuda(), c, start=[0, int(k.shape[2]), 0])


def _tiny_llama(**kw):
    """A 2-layer Llama (GQA 2, head_dim 32) with random weights on the GPU."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, initializer_range=0.2,
                                   **kw)
    return transformers.LlamaForCausalLM(cfg).eval().cuda()


def test_transformers_on_cuda():
    transformers = pytest.importorskip("transformers")
    from oscar.integrations.transformers import OScaRCache

    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 40), device="cuda")

    def run(impl, cache, **kw):
        model.set_attn_implementation(impl)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                                  past_key_values=cache, **kw)

    ref = run("sdpa", transformers.DynamicCache(config=model.config))
    out = run("oscar", OScaRCache(model.config, NEVER))
    assert torch.equal(ref, out)
    out = run("oscar", OScaRCache(model.config, INT2), num_beams=2)  # packed path + reorder
    assert out.shape == (2, 48)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    # left padding on CUDA (issue 22 item 2): the packed path with per-row starts; the
    # never-quantizing configuration equals SDPA exactly, INT2 equals the CPU reference's tokens
    ref = run("sdpa", transformers.DynamicCache(config=model.config), attention_mask=am)
    out = run("oscar", OScaRCache(model.config, NEVER), attention_mask=am)
    assert torch.equal(ref, out)
    out = run("oscar", OScaRCache(model.config, INT2), attention_mask=am)
    assert out.shape == (2, 48)


def test_graphed_generate_on_cuda():
    """The whole decode step of a tiny Llama in one CUDA graph: the replayed tokens and packed
    bytes equal the same static step run eagerly (cuda_graph=False), bit for bit, on left-padded
    rows across flushes; the first tokens equal generate()'s."""
    pytest.importorskip("transformers")
    from oscar.integrations.transformers import OScaRCache, graphed_generate

    model = _tiny_llama(eos_token_id=None)
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    am = torch.ones_like(ids)
    am[1, :5] = 0
    graphed, gcache = graphed_generate(model, ids, 80, attention_mask=am, oscar_config=INT2)
    eager, ecache = graphed_generate(model, ids, 80, attention_mask=am, oscar_config=INT2,
                                     cuda_graph=False)
    assert torch.equal(graphed, eager)
    for a, b in zip(gcache.layers, ecache.layers):  # the same bytes, replayed or eager
        assert a.cache.seq_lens.tolist() == b.cache.seq_lens.tolist() == [119, 119]
        pa, pb = a.cache.packed().arrays(), b.cache.packed().arrays()
        for name in pa:
            assert torch.equal(pa[name], pb[name]), name
        for x, y in zip(a.cache.residual(), b.cache.residual()):
            assert torch.equal(x, y)
    model.set_attn_implementation("oscar")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=80,
                             do_sample=False, past_key_values=OScaRCache(model.config, INT2))
    # generate() plans its kernel splits from the exact lengths, the static step from the
    # capacity: the same attention summed in another order (float32 rounding), so the logits
    # differ in the last bits and a near-tie may flip a later token; the first 16 must agree
    # (on the reference backend, CPU CI checks all of them and every packed byte)
    assert torch.equal(graphed[:, :16], ref[:, 40:56])


def test_assisted_decoding_blocks_run_on_the_packed_cache_on_cuda():
    """Prompt-lookup decoding verifies blocks of up to 11 tokens: 22 rows per KV head at GQA 2,
    which the CUDA integration now runs on the packed cache (v3 row groups) instead of
    dequantizing the history. A never-quantizing configuration equals SDPA exactly."""
    transformers = pytest.importorskip("transformers")
    from oscar.integrations import transformers as oit

    model = _tiny_llama()
    ids = torch.randint(0, 16, (1, 60), device="cuda")  # a small vocabulary: lookups hit
    calls = []
    real = oit.OScaRLayer._packed_path

    def spy(self, num_q_heads, q_len):
        calls.append((q_len, real(self, num_q_heads, q_len)))
        return calls[-1][1]

    def run(impl, cache):
        model.set_attn_implementation(impl)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.generate(input_ids=ids, max_new_tokens=24, do_sample=False,
                                  prompt_lookup_num_tokens=10, past_key_values=cache)

    ref = run("sdpa", transformers.DynamicCache(config=model.config))
    oit.OScaRLayer._packed_path = spy
    try:
        out = run("oscar", oit.OScaRCache(model.config, NEVER))
    finally:
        oit.OScaRLayer._packed_path = real
    assert torch.equal(ref, out)
    assert any(q_len > 8 and packed for q_len, packed in calls), calls


def test_decode_q_lens_leave_no_kernel_to_prepare_during_generation():
    """OScaRCache(decode_q_lens=range(1, 12)): after the prefill every verification block of
    prompt-lookup decoding (up to 11 tokens) finds its kernels ready: the kernel cache's
    counters (hits = loaded, misses = compiled) do not move during the generation."""
    pytest.importorskip("transformers")
    from oscar.integrations import transformers as oit
    from oscar.runtime import kernel_cache_info

    model = _tiny_llama()
    model.set_attn_implementation("oscar")
    ids = torch.randint(0, 16, (1, 60), device="cuda")
    cache = oit.OScaRCache(model.config, INT2, decode_q_lens=range(1, 12))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)  # the prefill prepares
    before = kernel_cache_info()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(input_ids=ids, max_new_tokens=24, do_sample=False,
                       prompt_lookup_num_tokens=10,
                       past_key_values=oit.OScaRCache(model.config, INT2,
                                                      decode_q_lens=range(1, 12)))
    after = kernel_cache_info()
    # the second cache's prefill finds everything in memory: no load, no compile at all
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
