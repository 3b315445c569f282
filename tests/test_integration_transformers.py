"""oscar.integrations.transformers on tiny random models (CPU: the reference backend).

Three kinds of checks:

* exact: with a configuration that never quantizes (residual window longer than the run) the
  generated tokens equal DynamicCache + SDPA, for every generate() mode the integration touches;
* tolerance: with INT2/INT4 quantization the integration's logits equal a dense model run over
  the dequantized cache (``decode_attention`` is exact attention over ``dequantize_kv``; the
  reference computes in float64, SDPA in float32: ``LOGIT_TOL`` below), and a left-padded row
  equals its prompt run alone;
* errors: unsupported models, masks and operations raise ValueError/TypeError with a message.

Models: 2 layers, hidden 64, 4 query heads over 2 KV heads (GQA 2) of head_dim 32;
``initializer_range=0.2`` so that greedy tokens vary. torch runs on one thread (tiny matmuls are
10-50x slower when torch's pool competes for 2 shared cores).
"""

import copy
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import oscar  # noqa: E402
from oscar.integrations import transformers as oit  # noqa: E402
from oscar.integrations.transformers import OScaRCache  # noqa: E402
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig,  # noqa: E402
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

#: never quantizes in these runs (prompts + generated tokens < 1024)
NEVER = oscar.OScaRConfig(residual_length=1024)
#: quantizes from the 32nd token on (short prompts reach the packed path)
INT2 = oscar.OScaRConfig(residual_length=32)
INT4 = oscar.OScaRConfig(key_bits=4, value_bits=4, residual_length=32)
#: |logit difference| bound between the integration (float64 reference attention over the packed
#: cache) and SDPA float32 over the dequantized cache: both are exact attention over the same
#: float32 K/V, so they differ by float32 rounding of the attention output (~1e-7 relative),
#: amplified by two layers and the LM head (weights ~0.2); measured: at most 7e-6 on logits of
#: magnitude up to 5 (Llama and Mistral, INT2 and INT4), so 1e-4 leaves a 15x margin.
LOGIT_TOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(cls=LlamaForCausalLM, ccls=LlamaConfig, layers=2, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                initializer_range=0.2, max_position_embeddings=512)
    base.update(kw)
    return cls(ccls(**base)).eval()


def gen(model, impl, cache, seed=1, **kw):
    model.set_attn_implementation(impl)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(past_key_values=cache, **kw)


def both(model, ocfg=NEVER, **kw):
    ref = gen(model, "sdpa", DynamicCache(config=model.config), **kw)
    out = gen(model, "oscar", OScaRCache(model.config, ocfg), **kw)
    return ref, out


def prompts(batch=2, length=12, pads=(0, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, length), generator=g)
    am = torch.ones_like(ids)
    for b, p in enumerate(pads[:batch]):
        am[b, :p] = 0
        ids[b, :p] = 0
    return ids, am


@pytest.fixture(scope="module")
def llama():
    return tiny()


# --- exact: never-quantizing configuration == DynamicCache + SDPA ------------------------------
@pytest.mark.parametrize("mode", ["greedy", "left_padded", "beam", "sample",
                                  "chunked_prefill_small", "chunked_prefill_large",
                                  "prompt_lookup"])
def test_never_quantized_equals_dynamic_cache(llama, mode):
    ids, am = prompts()
    long_ids, _ = prompts(1, 40, (0,), seed=3)
    kw = {
        "greedy": dict(input_ids=ids[:1], max_new_tokens=10, do_sample=False),
        "left_padded": dict(input_ids=ids, attention_mask=am, max_new_tokens=10, do_sample=False),
        "beam": dict(input_ids=ids, attention_mask=am, max_new_tokens=8, num_beams=3,
                     num_return_sequences=2, do_sample=False),
        "sample": dict(input_ids=ids[:1], max_new_tokens=8, do_sample=True,
                       num_return_sequences=3),
        # chunks of 5 tokens: G * q_len = 10 rows, the packed decode path
        "chunked_prefill_small": dict(input_ids=ids[:1], max_new_tokens=6, do_sample=False,
                                      prefill_chunk_size=5),
        # chunks of 16 tokens: 32 rows > MAX_DECODE_ROWS, the chunk path
        "chunked_prefill_large": dict(input_ids=long_ids, max_new_tokens=6, do_sample=False,
                                      prefill_chunk_size=16),
        # speculative verification of up to 3 tokens and crop of the rejected ones
        "prompt_lookup": dict(input_ids=torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]]),
                              max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3),
    }[mode]
    ref, out = both(llama, **kw)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("family", ["qwen3_mixed_sliding", "mistral_sliding", "qwen2"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_never_quantized_other_families(family, chunk):
    """Sliding windows of 6 tokens cut into the history: one query -> per-row start on the
    packed path; 5-token prefill chunks -> a different start per query -> the chunk path."""
    cls, ccls, kw = {
        "qwen3_mixed_sliding": (Qwen3ForCausalLM, Qwen3Config,
                                dict(layer_types=["full_attention", "sliding_attention"],
                                     sliding_window=6, use_sliding_window=True)),
        "mistral_sliding": (MistralForCausalLM, MistralConfig, dict(sliding_window=6)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    }[family]
    model = tiny(cls, ccls, **kw)
    ids, am = prompts(pads=(0, 3))  # padding shorter than a chunk (docs/integrations.md)
    ref, out = both(model, input_ids=ids, attention_mask=am, max_new_tokens=10, do_sample=False,
                    prefill_chunk_size=chunk)
    assert torch.equal(ref, out)


def test_continuation_and_deepcopy(llama):
    """One cache over two generate() calls; a deep-copied prompt cache reused twice."""
    ids, _ = prompts(1, 12, (0,))
    first = gen(llama, "sdpa", DynamicCache(config=llama.config), input_ids=ids,
                max_new_tokens=5, do_sample=False)
    more = torch.cat([first, torch.tensor([[7, 9]])], dim=1)
    dyn = DynamicCache(config=llama.config)
    gen(llama, "sdpa", dyn, input_ids=ids, max_new_tokens=5, do_sample=False)
    ref = gen(llama, "sdpa", dyn, input_ids=more, max_new_tokens=5, do_sample=False)

    cache = OScaRCache(llama.config, INT2)
    gen(llama, "oscar", cache, input_ids=ids, max_new_tokens=5, do_sample=False)
    prompt_cache = copy.deepcopy(cache)
    out1 = gen(llama, "oscar", cache, input_ids=more, max_new_tokens=5, do_sample=False)
    out2 = gen(llama, "oscar", copy.deepcopy(prompt_cache), input_ids=more, max_new_tokens=5,
               do_sample=False)
    assert torch.equal(out1, out2)  # the copy is independent and complete
    assert prompt_cache.get_seq_length() == 16  # untouched by the generations from its copies

    cache = OScaRCache(llama.config, NEVER)
    gen(llama, "oscar", cache, input_ids=ids, max_new_tokens=5, do_sample=False)
    out = gen(llama, "oscar", cache, input_ids=more, max_new_tokens=5, do_sample=False)
    assert torch.equal(ref, out)


def test_per_layer_configs_and_json(llama, tmp_path):
    ids, am = prompts()
    ref, out = both(llama, [None, NEVER], input_ids=ids, attention_mask=am, max_new_tokens=8,
                    do_sample=False)
    assert torch.equal(ref, out)
    spec = {"format": "oscar-layer-configs", "version": 1, "num_layers": 2,
            "layers": [None, {"key_bits": 4, "value_bits": 4, "residual_length": 32}],
            "bits_per_element": 9.0}
    path = tmp_path / "layers.json"
    path.write_text(json.dumps(spec))
    for s in (spec, str(path), path):
        cache = OScaRCache(llama.config, s)
        assert cache.layer_configs == [None, INT4]
        assert type(cache.layers[0]).__name__ == "DynamicLayer"


# --- tolerance: quantized runs ------------------------------------------------------------------
def _decode_logits_both_ways(model, ocfg, ids, am):
    """Logits of one decode step after the prompt: through the integration, and by SDPA over
    a DynamicCache filled with the dequantized OScaR cache."""
    model.set_attn_implementation("oscar")
    cache = OScaRCache(model.config, ocfg)
    with torch.no_grad():
        # positions as generate() sets them: the first valid token of every row is position 0
        pos0 = (am.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=ids, attention_mask=am, position_ids=pos0, past_key_values=cache)
        dense = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            k, v = oscar.dequantize_kv(layer.cache)
            dense.update(k, v, i)
        step = torch.tensor([[5]] * ids.shape[0])
        am2 = torch.cat([am, torch.ones_like(step)], dim=1)
        pos = (am2.cumsum(-1) - 1)[:, -1:]
        got = model(input_ids=step, attention_mask=am2, position_ids=pos,
                    past_key_values=cache).logits
        model.set_attn_implementation("sdpa")
        want = model(input_ids=step, attention_mask=am2, position_ids=pos,
                     past_key_values=dense).logits
    return got, want, cache


@pytest.mark.parametrize("ocfg", [INT2, INT4], ids=["int2", "int4"])
@pytest.mark.parametrize("family", ["llama", "mistral_window_16"])
def test_quantized_decode_equals_attention_over_dequantized_cache(llama, ocfg, family):
    """Left-padded batch of 2 (9 padding tokens in row 1), 70 tokens: 64 quantized; Mistral's
    16-token window starts inside the quantized part (a per-row start on the packed path)."""
    model = llama if family == "llama" else tiny(MistralForCausalLM, MistralConfig,
                                                 sliding_window=16)
    ids, am = prompts(2, 70, (0, 9))
    got, want, cache = _decode_logits_both_ways(model, ocfg, ids, am)
    assert cache.layers[0].cache.quantized_len == 64  # the packed path was exercised
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=LOGIT_TOL)


def test_quantized_left_padded_row_equals_prompt_alone(llama):
    """A row padded by a multiple of residual_length (here 32 = one window) holds, for its real
    tokens, the same codes as the prompt alone: the padded window is 32 copies of the first
    valid token (its own key groups), later windows line up. Its logits equal the alone run's
    within float rounding (padded keys get exactly zero weight). Padding that is not a multiple
    of residual_length moves the window and key-group boundaries: then only the tokens are
    expected to agree, not the codes."""
    pad = INT2.residual_length
    alone_ids, _ = prompts(1, 45, (0,), seed=5)
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), alone_ids], dim=1)
    ids = torch.cat([ids, torch.randint(0, 128, (1, pad + 45))], dim=0)
    am = torch.ones_like(ids)
    am[0, :pad] = 0
    got_b, _, cb = _decode_logits_both_ways(llama, INT2, ids, am)
    got_a, _, ca = _decode_logits_both_ways(llama, INT2, alone_ids, torch.ones_like(alone_ids))
    np.testing.assert_allclose(got_b[0].numpy(), got_a[0].numpy(), rtol=0, atol=LOGIT_TOL)
    for lb, la in zip(cb.layers, ca.layers):
        pb, pa = lb.cache.packed(), la.cache.packed()
        n = pa.v_codes.shape[2]  # the alone run's quantized tokens
        assert np.array_equal(pb.v_codes[0, :, pad:pad + n], pa.v_codes[0])
        assert np.array_equal(pb.k_codes[0, :, pad // 32:(pad + n) // 32], pa.k_codes[0])
        assert np.array_equal(pb.k_params[0, :, pad // 32:(pad + n) // 32], pa.k_params[0])
        assert np.array_equal(pb.norms[0, :, pad:pad + n], pa.norms[0])
    # the greedy continuations agree too
    out_b = gen(llama, "oscar", OScaRCache(llama.config, INT2), input_ids=ids,
                attention_mask=am, max_new_tokens=8, do_sample=False)
    out_a = gen(llama, "oscar", OScaRCache(llama.config, INT2), input_ids=alone_ids,
                max_new_tokens=8, do_sample=False)
    assert torch.equal(out_b[0, -8:], out_a[0, -8:])


def test_chunk_path_equals_decode_path(llama, monkeypatch):
    """A 12-token block over a quantized history (24 rows > MAX_DECODE_ROWS: dequantize once +
    SDPA) equals the packed decode path forced to take it."""
    ids, am = prompts(2, 70, (0, 9))
    block = torch.randint(0, 128, (2, 12))
    am2 = torch.cat([am, torch.ones_like(block)], dim=1)
    pos = (am2.cumsum(-1) - 1)[:, -12:]
    llama.set_attn_implementation("oscar")
    outs = []
    for rows in (oit.MAX_DECODE_ROWS, 10 ** 6):
        monkeypatch.setattr(oit, "MAX_DECODE_ROWS", rows)
        cache = OScaRCache(llama.config, INT2)
        with torch.no_grad():
            llama(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                  past_key_values=cache)
            outs.append(llama(input_ids=block, attention_mask=am2, position_ids=pos,
                              past_key_values=cache).logits)
    np.testing.assert_allclose(outs[0].numpy(), outs[1].numpy(), rtol=0, atol=LOGIT_TOL)


def test_beam_search_quantized_runs_and_reorders(llama):
    ids, am = prompts(2, 40, (0, 3))
    out = gen(llama, "oscar", OScaRCache(llama.config, INT2), input_ids=ids, attention_mask=am,
              max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False)
    assert out.shape == (6, 46)


# --- save / load --------------------------------------------------------------------------------
def test_save_load_round_trip_and_continue(llama, tmp_path):
    ids, am = prompts(2, 40, (0, 3))
    cache = OScaRCache(llama.config, [INT2, None])
    gen(llama, "oscar", cache, input_ids=ids, attention_mask=am, max_new_tokens=4,
        do_sample=False)
    path = tmp_path / "c.safetensors"
    cache.save(path)
    loaded = OScaRCache.load(path, llama.config)
    a, b = cache.layers[0], loaded.layers[0]
    for name, arr in a.cache.packed().arrays().items():
        got = b.cache.packed().arrays()[name]
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
    for x, y in zip(a.cache.residual(), b.cache.residual()):
        assert np.array_equal(x, y)
    assert np.array_equal(a.pad, b.pad)
    assert torch.equal(cache.layers[1].keys, loaded.layers[1].keys)
    more = torch.cat([ids, torch.randint(0, 128, (2, 4)), torch.tensor([[3], [4]])], dim=1)
    am_more = torch.cat([am, torch.ones(2, 5, dtype=am.dtype)], dim=1)
    o1 = gen(llama, "oscar", cache, input_ids=more, attention_mask=am_more, max_new_tokens=4,
             do_sample=False)
    o2 = gen(llama, "oscar", loaded, input_ids=more, attention_mask=am_more, max_new_tokens=4,
             do_sample=False)
    assert torch.equal(o1, o2)


def _saved_cache(tmp_path):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 2, 70, 32)).astype(np.float16)
    c = oscar.quantize_kv(k, k[:, :, ::-1].copy(), INT2)
    path = tmp_path / "one.safetensors"
    c.save(path)
    return c, path


def test_quantized_kv_cache_save_load_bit_exact(tmp_path):
    c, path = _saved_cache(tmp_path)
    d = oscar.QuantizedKVCache.load(path)
    assert (d.seq_len, d.quantized_len, d.dtype, d.config) == (70, 64, "float16", INT2)
    for name, arr in c.packed().arrays().items():
        assert np.array_equal(arr, d.packed().arrays()[name])
    for x, y in zip(c.residual(), d.residual()):
        assert np.array_equal(x, y)


def _rewrite(path, out, meta=None, drop=None, replace=None):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        m = dict(f.metadata())
    arrays = load_file(str(path))
    m.update(meta or {})
    if drop:
        arrays.pop(drop)
    if replace:
        arrays.update(replace)
    save_file(arrays, str(out), metadata=m)
    return out


def test_load_rejects_bad_files(tmp_path):
    c, path = _saved_cache(tmp_path)
    with pytest.raises(ValueError, match="format version '2'"):
        oscar.QuantizedKVCache.load(_rewrite(path, tmp_path / "v2.st", meta={"version": "2"}))
    data = path.read_bytes()
    (tmp_path / "cut.st").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        oscar.QuantizedKVCache.load(tmp_path / "cut.st")
    bad = np.zeros((2, 2, 32, 8), np.uint32)
    with pytest.raises(ValueError, match="array v_codes: expected shape"):
        oscar.QuantizedKVCache.load(_rewrite(path, tmp_path / "shape.st",
                                             replace={"layers.0.v_codes": bad}))
    with pytest.raises(ValueError, match=r"expected arrays .*norms"):
        oscar.QuantizedKVCache.load(_rewrite(path, tmp_path / "miss.st", drop="layers.0.norms"))
    with pytest.raises(ValueError, match="expected an oscar cache file"):
        oscar.QuantizedKVCache.load(_rewrite(path, tmp_path / "fmt.st", meta={"format": "x"}))


# --- errors -----------------------------------------------------------------------------------
def test_errors_unsupported_models():
    gpt2 = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=64)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        OScaRCache(gpt2)
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=96, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=48)
    with pytest.raises(ValueError, match="layer 0: head_dim must be a power of two"):
        OScaRCache(cfg)
    assert isinstance(OScaRCache(cfg, [None]).layers[0], transformers.cache_utils.DynamicLayer)
    q3 = Qwen3Config(num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"],
                     head_dim=32)
    with pytest.raises(ValueError, match="chunked_attention"):
        OScaRCache(q3)


def test_errors_configs(llama):
    with pytest.raises(ValueError, match="expected 2 per-layer configurations"):
        OScaRCache(llama.config, [INT2])
    with pytest.raises(TypeError, match=r"\[1\]: expected OScaRConfig or None"):
        OScaRCache(llama.config, [INT2, "int4"])
    spec = {"format": "oscar-layer-configs", "version": 1, "num_layers": 3, "layers": [None] * 3}
    with pytest.raises(ValueError, match="expected 2 layers"):
        OScaRCache(llama.config, spec)
    with pytest.raises(ValueError, match="'version': expected 1"):
        OScaRCache(llama.config, {**spec, "version": 2})
    with pytest.raises(ValueError, match=r"layers\[1\]: unknown OScaRConfig fields"):
        OScaRCache(llama.config, {**spec, "num_layers": 2, "layers": [None, {"bitz": 2}]})
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_cache_len: expected a positive int"):
            OScaRCache(llama.config, INT2, max_cache_len=bad)
    cache = OScaRCache(llama.config, INT2, max_cache_len=4096)
    assert all(layer.max_cache_len == 4096 for layer in cache.layers)


def test_errors_at_run_time(llama):
    ids, am = prompts()
    with pytest.raises(ValueError, match="set_attn_implementation\\('oscar'\\)"):
        gen(llama, "sdpa", OScaRCache(llama.config, INT2), input_ids=ids[:1], max_new_tokens=2)
    right = am.flip(1)
    with pytest.raises(ValueError, match="left padding only"):
        gen(llama, "oscar", OScaRCache(llama.config, INT2), input_ids=ids,
            attention_mask=right, max_new_tokens=2)
    llama.set_attn_implementation("oscar")
    mask4 = torch.ones(1, 1, 12, 12, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="custom 4-D masks are not supported"), torch.no_grad():
        llama(input_ids=ids[:1], attention_mask=mask4,
              past_key_values=OScaRCache(llama.config, INT2))
    # a chunk made only of padding for one row (padding longer than the prefill chunk)
    ids2, am2 = prompts(2, 12, (0, 8))
    with pytest.raises(ValueError, match="all left padding"):
        gen(llama, "oscar", OScaRCache(llama.config, INT2), input_ids=ids2,
            attention_mask=am2, max_new_tokens=2, prefill_chunk_size=4)


def test_crop_inside_residual_only(llama):
    ids, _ = prompts(1, 40, (0,))
    cache = OScaRCache(llama.config, INT2)
    llama.set_attn_implementation("oscar")
    with torch.no_grad():
        llama(input_ids=ids, past_key_values=cache)
    cache.crop(-5)
    assert cache.get_seq_length() == 35
    with pytest.raises(ValueError, match="layer 0: cannot crop 35 tokens to 30: .*quantized"):
        cache.crop(-5)


# --- the reference's per-row start ------------------------------------------------------------
def test_reference_start_masks_leading_tokens():
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 2, 45, 32)).astype(np.float32)
    v = rng.standard_normal((2, 2, 45, 32)).astype(np.float32)
    c = oscar.quantize_kv(k, v, INT2)
    q = rng.standard_normal((2, 4, 3, 32)).astype(np.float32)
    start = np.array([0, 7])
    got = oscar.decode_attention(q, c, start=start)
    k_hat, v_hat = oscar.dequantize_kv(c)
    for b in range(2):
        want = oscar.reference.attention_dense(q[b:b + 1], k_hat[b:b + 1, :, start[b]:],
                                               v_hat[b:b + 1, :, start[b]:])
        np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-5, atol=1e-6)
    base = oscar.decode_attention(q, c)
    assert np.array_equal(oscar.decode_attention(q, c, start=[0, 0]), base)
    with pytest.raises(ValueError, match=r"start\[1\] = 43"):
        oscar.decode_attention(q, c, start=[0, 43])
    with pytest.raises(ValueError, match="expected shape"):
        oscar.decode_attention(q, c, start=[0])
    with pytest.raises(TypeError, match="integer dtype"):
        oscar.decode_attention(q, c, start=np.array([0.0, 1.0]))


def test_select_batch_equals_quantizing_the_gathered_rows():
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, 2, 70, 32)).astype(np.float16)
    v = rng.standard_normal((3, 2, 70, 32)).astype(np.float16)
    idx = np.array([2, 2, 0, 1])
    got = oscar.quantize_kv(k, v, INT2).select_batch(idx)
    want = oscar.quantize_kv(k[idx], v[idx], INT2)
    assert got.batch == 4
    for name, arr in want.packed().arrays().items():
        assert np.array_equal(got.packed().arrays()[name], arr), name
    for x, y in zip(got.residual(), want.residual()):
        assert np.array_equal(x, y)
    with pytest.raises(ValueError, match=r"values in \[0, 4\)"):
        got.select_batch([4])


def test_sharded_heads_need_per_head_norms(llama):
    """Under tensor parallelism a rank holds num_kv_heads / world_size KV heads (simulated here:
    the cache is built from a config that declares twice the model's KV heads). The token norm
    over a rank's heads would differ from one process: norm_scope='token' raises, naming
    norm_scope='head'; norm_scope='head' runs."""
    import copy as _copy

    sharded = _copy.deepcopy(llama.config)
    sharded.num_key_value_heads *= 2
    sharded.num_attention_heads *= 2
    ids, _ = prompts(1, 40, (0,))
    with pytest.raises(ValueError, match=r"holds 2 of the model's 4 KV heads.*norm_scope='head'"):
        gen(llama, "oscar", OScaRCache(sharded, INT2), input_ids=ids, max_new_tokens=2)
    out = gen(llama, "oscar", OScaRCache(sharded, INT2.replace(norm_scope="head")),
              input_ids=ids, max_new_tokens=2)
    assert out.shape == (1, 42)
    # KIVI-style (no token scaling) has no cross-head norm: sharding does not matter
    gen(llama, "oscar", OScaRCache(sharded, INT2.replace(scale_tokens=False)), input_ids=ids,
        max_new_tokens=2)


# --- graphed_generate: the graphable static decode step ----------------------------------------
@pytest.mark.parametrize("ocfg", [INT2, INT4], ids=["int2", "int4"])
def test_graphed_generate_equals_generate(llama, ocfg):
    """The static step (lengths read on the device on CUDA, no mask, starts uploaded once) is
    the same computation as generate()'s decode path: equal greedy tokens and equal caches, on
    left-padded rows, across several flushes (40 + 30 tokens, windows of 32)."""
    ids, am = prompts(2, 40, (0, 7), seed=3)
    toks, cache = oit.graphed_generate(llama, ids, 30, attention_mask=am, oscar_config=ocfg)
    assert toks.shape == (2, 30) and toks.dtype == torch.long
    ref_cache = OScaRCache(llama.config, ocfg)
    # (eos_token_id=None: the graphed loop has no stopping criteria)
    ref = gen(llama, "oscar", ref_cache, input_ids=ids, attention_mask=am, max_new_tokens=30,
              do_sample=False, eos_token_id=None)
    assert torch.equal(toks, ref[:, 40:])
    for a, b in zip(cache.layers, ref_cache.layers):
        assert a._static is None  # left the static mode
        assert a.cache.seq_lens.tolist() == b.cache.seq_lens.tolist() == [69, 69]
        for x, y in zip(a.cache.packed().arrays().values(), b.cache.packed().arrays().values()):
            np.testing.assert_array_equal(x, y)


def test_graphed_generate_needs_no_host_length(llama, monkeypatch):
    """A captured step replays whatever host values it saw at capture: the layers' host-side
    length (get_seq_length, from which transformers derives cache_position and the mask sizes)
    is frozen in the graph. Freezing it here at its value when the static decode begins must
    leave the tokens unchanged: nothing the step computes may depend on it."""
    ids, am = prompts(2, 40, (0, 7), seed=3)
    want, _ = oit.graphed_generate(llama, ids, 20, attention_mask=am, oscar_config=INT2)
    real = oit.OScaRLayer.get_seq_length
    frozen = {}

    def get_seq_length(self):
        if self._static is None:
            return real(self)
        return frozen.setdefault(self.layer_idx, real(self))

    monkeypatch.setattr(oit.OScaRLayer, "get_seq_length", get_seq_length)
    got, cache = oit.graphed_generate(llama, ids, 20, attention_mask=am, oscar_config=INT2)
    assert frozen and torch.equal(got, want)
    assert all(layer.cache.seq_lens.tolist() == [59, 59] for layer in cache.layers)


def test_graphed_generate_never_quantized_equals_dynamic_cache(llama):
    ids, am = prompts(2, 20, (0, 4), seed=4)
    toks, _ = oit.graphed_generate(llama, ids, 12, attention_mask=am, oscar_config=NEVER)
    ref = gen(llama, "sdpa", DynamicCache(config=llama.config), input_ids=ids,
              attention_mask=am, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(toks, ref[:, 20:])
    one, _ = oit.graphed_generate(llama, ids, 1, attention_mask=am, oscar_config=NEVER)
    assert torch.equal(one[:, 0], toks[:, 0])


def test_graphed_generate_errors(llama):
    ids, am = prompts(1, 10, (0,))
    with pytest.raises(ValueError, match="max_new_tokens"):
        oit.graphed_generate(llama, ids, 0)
    with pytest.raises(TypeError, match="input_ids"):
        oit.graphed_generate(llama, ids.float(), 4)
    with pytest.raises(ValueError, match="attention_mask"):
        oit.graphed_generate(llama, ids, 4, attention_mask=am[:, :5])
    with pytest.raises(ValueError, match="every layer must be quantized"):
        oit.graphed_generate(llama, ids, 4, oscar_config=[INT2, None])
    with pytest.raises(ValueError, match="cuda_graph"):
        oit.graphed_generate(llama, ids, 4, cuda_graph=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        oit.graphed_generate(llama, ids, 600)
    mistral = tiny(MistralForCausalLM, MistralConfig, sliding_window=16)
    with pytest.raises(ValueError, match="sliding window"):
        oit.graphed_generate(mistral, ids, 8)
    # the static layer takes one token per step
    cache = OScaRCache(llama.config, INT2)
    llama.set_attn_implementation("oscar")
    with torch.no_grad():
        llama(input_ids=ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="begin_static needs the prompt"):
            OScaRCache(llama.config, INT2).layers[0].begin_static(64, 4, torch.float32)
        for layer in cache.layers:
            layer.begin_static(64, 4, torch.float32)
        with pytest.raises(ValueError, match="one token per step"):
            llama(input_ids=ids[:, :2], past_key_values=cache, use_cache=True)


def test_packed_path_choice_per_backend():
    """Reference: up to MAX_DECODE_ROWS rows per KV head; CUDA: whatever the kernels take in at
    most MAX_HEAD_GROUPS launches (a stand-in store answers like the CUDA one)."""
    layer = oit.OScaRLayer(INT2, 0)
    layer.cache = oscar.quantize_kv(np.zeros((1, 2, 40, 32), np.float32),
                                    np.zeros((1, 2, 40, 32), np.float32), INT2)
    assert layer._packed_path(8, 4) and not layer._packed_path(8, 5)  # 16 / 20 rows

    class Store:
        def _head_groups(self, num_q_heads, q_len):
            rows = num_q_heads // 2 * q_len
            if q_len > 32:
                raise ValueError("q: q_len too many")
            return -(-rows // 32)

    class Cuda:
        backend, num_kv_heads, _store = "numba", 2, Store()

    layer.cache = Cuda()
    assert layer._packed_path(8, 8)  # 32 rows: one launch
    assert layer._packed_path(16, 16)  # 128 rows: 4 launches
    assert not layer._packed_path(16, 17)  # 5 launches: the chunk path's one dequantization
    assert not layer._packed_path(2, 40)  # no kernel takes q_len 40


@pytest.mark.parametrize("configs", [INT2, [None, INT2]])
def test_a_model_not_running_the_oscar_attention_is_a_clear_error(llama, configs):
    """The check runs once per forward, at the first packed layer (a dense first layer is
    skipped): a model left on "sdpa" gets the instruction, not a crash inside SDPA."""
    ids, am = prompts(1, 20, (0,), seed=6)
    llama.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match=r"call model.set_attn_implementation\('oscar'\)"):
        with torch.no_grad():
            llama(input_ids=ids, attention_mask=am,
                  past_key_values=OScaRCache(llama.config, configs), use_cache=True)


def test_decode_q_lens_are_prepared_at_the_prefill(llama, monkeypatch):
    """OScaRCache(decode_q_lens=...) prepares the decode kernels of those query lengths when
    the prompt is quantized (CUDA; a stand-in store records what is prepared), only those that
    run on the packed cache; the host backend has nothing to prepare. Bad values are rejected."""
    for bad in ((), (0,), (1, 2.0), (True,), 3, None):
        with pytest.raises(ValueError, match="decode_q_lens"):
            OScaRCache(llama.config, INT2, decode_q_lens=bad)
    ids, am = prompts(1, 40, (0,), seed=5)
    cache = OScaRCache(llama.config, INT2, decode_q_lens=range(1, 6))
    gen(llama, "oscar", cache, input_ids=ids, attention_mask=am, max_new_tokens=2,
        do_sample=False)  # the reference backend: nothing to prepare, no error
    assert all(layer.decode_q_lens == (1, 2, 3, 4, 5) for layer in cache.layers)

    warmed = []

    class Store:
        def _head_groups(self, num_q_heads, q_len):
            return 1 if q_len <= 4 else 5  # q_len 5: more launches than the packed path takes

        def _warm_decode(self, num_q_heads, q_len, q_dtype):
            warmed.append((num_q_heads, q_len, q_dtype))

    class Cuda:
        backend, num_kv_heads, _store = "numba", 2, Store()

    layer = oit.OScaRLayer(INT2, 0, decode_q_lens=(1, 2, 4, 5))
    layer.cache = Cuda()
    layer._prepare_q_lens(8, torch.zeros(1, 8, 1, 32, dtype=torch.bfloat16))
    assert warmed == [(8, 2, "bfloat16"), (8, 4, "bfloat16")]
