"""``oscar report --model`` (oscar.doctor): tiny random Llama and Qwen3 models saved with
``save_pretrained`` into temporary directories (no hub access needed).

Kinds: exact (the capture equals the model's own projections + RoPE; the per-layer plan round-trips
through JSON), tolerance (the report's numbers against the library's functions applied to fresh,
non-streamed caches of the captured tensors), and behaviour (CLI outputs, clear errors, checks that
run before the computation).
"""

import json
import math
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import oscar  # noqa: E402
from oscar import _capture, cli, doctor  # noqa: E402
from oscar.layer_configs import load_layer_configs, save_layer_configs  # noqa: E402
from oscar.reference.attention import attention_dense  # noqa: E402
from oscar.report import rel_err  # noqa: E402

TOKENS = 256  # the shortest text the doctor accepts: two residual windows of 128
# Small, with a large initializer range so that random activations are far from uniform
# (the recipe); head_dim 32 and 64 are the smallest OScaR head sizes.
_SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=512,
              initializer_range=0.2, max_position_embeddings=1024)


def _save(path, config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **_SMALL)
    return _save(tmp_path_factory.mktemp("llama"), cfg)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    cfg = transformers.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   **_SMALL)
    return _save(tmp_path_factory.mktemp("qwen3"), cfg)


@pytest.fixture(scope="module")
def llama_tok_dir(tmp_path_factory):
    """A Llama with a byte-level tokenizer (one token per byte, 257 ids < vocab 512)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    path = tmp_path_factory.mktemp("llama_tok")
    cfg = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **_SMALL)
    _save(path, cfg)
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen3_report(qwen3_dir):
    return doctor.diagnose(qwen3_dir, tokens=TOKENS, progress=False)


def _captured(model_dir, tokens=TOKENS):
    config = _capture.load_config(model_dir)
    model, tok = _capture.load_model(model_dir, config, "cpu")
    ids, _ = _capture.token_ids(tok, config.vocab_size, tokens, None)
    pos = doctor.query_positions(ids.size)
    return model, ids, pos, _capture.capture(model, ids, pos)


# --- the capture -----------------------------------------------------------------------------

def test_capture_equals_the_models_own_projections(llama_dir):
    """Layer 0's captured q/k/v equal q_proj/k_proj/v_proj of the normed embeddings with RoPE
    applied by the model's own functions (an independent path through the model)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, ids, pos, layers = _captured(llama_dir)
    base, attn = model.model, model.model.layers[0].self_attn
    d = attn.head_dim
    with torch.no_grad():
        x = base.layers[0].input_layernorm(base.embed_tokens(torch.as_tensor(ids)[None]))
        t = x.shape[1]
        q = attn.q_proj(x).view(1, t, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, t, -1, d).transpose(1, 2)
        v = attn.v_proj(x).view(1, t, -1, d).transpose(1, 2)
        cos, sin = base.rotary_emb(x, torch.arange(t)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    np.testing.assert_allclose(layers[0].k, k.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers[0].v, v.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers[0].q, q[:, :, pos].numpy(), rtol=1e-5, atol=1e-5)
    assert layers[0].scale == pytest.approx(d**-0.5)
    assert len(layers) == model.config.num_hidden_layers


def test_capture_leaves_the_model_output_unchanged(llama_dir):
    model, ids, pos, _ = _captured(llama_dir)
    with torch.no_grad():
        inp = torch.as_tensor(ids)[None]
        hooked = model(inp).logits
        model.set_attn_implementation("sdpa")
        plain = model(inp).logits
    torch.testing.assert_close(hooked, plain)


def test_unhookable_attention_is_a_clear_error(llama_dir):
    """An architecture whose attention bypasses AttentionInterface records nothing: emulated by
    switching the model back to plain SDPA after loading it with the capture."""
    model, ids, pos, _ = _captured(llama_dir)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="model_type 'llama'.*cannot be hooked"):
        _capture.capture(model, ids, pos)


# --- the numbers -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["KIVI INT2", "OScaR INT2", "OScaR-head INT4"])
def test_numbers_equal_the_library_on_the_captured_tensors(qwen3_dir, qwen3_report, name):
    """Per decode query, a cache of the first p + 1 tokens built from scratch by quantize_kv
    (not streamed), decode_attention with its lse, dequantize_kv: the report's key err, logit
    err, KL and attn err follow. Tolerances: attn err and key err come from the same float32
    library outputs (1e-9 rel, summation order only); logit err and KL here use the library's
    float32 lse instead of the report's float64 logsumexp (KL of 1e-3 nats needs lse to about
    1e-7 relative, so 1e-3 rel; 1e-7 absolute for configurations with near-zero KL)."""
    cfg = dict(doctor.CONFIGS)[name]
    _, ids, pos, layers = _captured(qwen3_dir)
    assert qwen3_report.positions == pos.tolist()
    for li, layer in enumerate(layers):
        q, k, v, scale = layer.q, layer.k, layer.v, layer.scale
        hq, group = q.shape[1], q.shape[1] // k.shape[1]
        outs, refs, kls, sq_err, n_err = [], [], [], 0.0, 0
        for i, p in enumerate(pos):
            cache = oscar.quantize_kv(k[:, :, : p + 1], v[:, :, : p + 1], cfg)
            out, lse = oscar.decode_attention(q[:, :, i : i + 1], cache, scale=scale,
                                              return_lse=True)
            k_hat, _ = oscar.dequantize_kv(cache)
            outs.append(out)
            refs.append(attention_dense(q[:, :, i : i + 1], k[:, :, : p + 1], v[:, :, : p + 1],
                                        scale=scale))
            s = scale * np.einsum("bhd,bhtd->bht", q[:, :, i].astype(np.float64),
                                  np.repeat(k[:, :, : p + 1], group, axis=1).astype(np.float64))
            s_hat = scale * np.einsum("bhd,bhtd->bht", q[:, :, i].astype(np.float64),
                                      np.repeat(k_hat, group, axis=1).astype(np.float64))
            tq = cache.quantized_len
            sq_err += float(((s_hat - s)[..., :tq] ** 2).sum())
            n_err += hq * tq
            lp = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - s.max(-1, keepdims=True)
            lp_hat = s_hat - lse[:, :, 0, None].astype(np.float64)
            np.testing.assert_allclose(np.exp(lp_hat).sum(-1), 1.0, rtol=1e-5)
            kls.append((np.exp(lp) * (lp - lp_hat)).sum(-1))
        m = qwen3_report.metrics[li][name]
        assert m.attn_err == pytest.approx(rel_err(np.concatenate(outs, 2),
                                                   np.concatenate(refs, 2)), rel=1e-9)
        assert m.logit_err == pytest.approx(math.sqrt(sq_err / n_err), rel=1e-9)
        assert m.kl == pytest.approx(float(np.mean(kls)), rel=1e-3, abs=1e-7)
        full = oscar.quantize_kv(k, v, cfg)
        kf, vf = oscar.dequantize_kv(full)
        tq = full.quantized_len
        assert m.key_err == pytest.approx(rel_err(kf[:, :, :tq], k[:, :, :tq]), rel=1e-9)
        assert m.value_err == pytest.approx(rel_err(vf[:, :, :tq], v[:, :, :tq]), rel=1e-9)


def test_token_norm_stats_on_designed_keys():
    """A designed layer: token 0 has a key 10x shorter than the others and takes almost all the
    attention; one channel is 8x the others."""
    rng = np.random.default_rng(0)
    t, d = 256, 32
    k = rng.standard_normal((1, 1, t, d)).astype(np.float32)
    k[..., 3] *= 8.0
    k[:, :, 0] *= 0.1
    q = np.zeros((1, 2, 4, d), np.float32)
    pos = doctor.query_positions(t, 4)
    v = rng.standard_normal((1, 1, t, d)).astype(np.float32)
    exact = doctor._Exact(q, k, v, pos, 1.0)
    exact.s[..., 0] = 50.0  # the sink logit: everything goes to token 0
    exact.p, exact.lse = doctor._softmax(exact.s, exact.visible)
    st = doctor.token_norm_stats(k, exact)
    assert st.low_norm_tokens[0] == 0 and st.min_norm_ratio < 0.2
    assert st.sinks[0]["token"] == 0 and st.sinks[0]["share"] > 0.99
    assert st.sinks[0]["norm_ratio"] == pytest.approx(st.min_norm_ratio)
    assert st.outlier_channels == 1 and st.channel_outlier_ratio > 4


# --- the recommendation ----------------------------------------------------------------------

def _metrics(errs):
    return {name: doctor.Metrics(0.0, 0.0, 0.0, 0.0, e, 0.0) for name, e in errs.items()}


def test_recommendation_rule():
    """Winner per budget by mean attn err; a layer above 2x the median INT2 error goes to the
    INT4 winner, or stays unquantized when it is also above 2x the INT4 median."""
    names = [n for n, _ in doctor.CONFIGS]
    base = {n: (0.6 if "INT2" in n else 0.2) for n in names}  # the others lose
    layers = []
    for li, (e2, e4) in enumerate([(0.2, 0.05), (0.2, 0.05), (0.9, 0.06), (0.2, 0.05),
                                   (0.9, 0.5)]):
        errs = dict(base, **{"OScaR INT2": e2, "rotation-only INT4": e4})
        layers.append(_metrics(errs))
    rec = doctor.recommend(layers, doctor.CONFIGS, num_kv_heads=8, head_dim=128)
    assert rec.best == {2: "OScaR INT2", 4: "rotation-only INT4"}
    assert rec.flagged == [2, 4]
    assert rec.plan == ["OScaR INT2", "OScaR INT2", "rotation-only INT4", "OScaR INT2", None]
    cfg = dict(doctor.CONFIGS)
    want = (3 * cfg["OScaR INT2"].bits_per_element(8, 128)
            + cfg["rotation-only INT4"].bits_per_element(8, 128) + 16) / 5
    assert rec.bits_per_element == pytest.approx(want)
    assert rec.mean_attn_err == pytest.approx((0.2 * 3 + 0.06 + 0.0) / 5)


# --- the per-layer configuration file ---------------------------------------------------------

def test_layer_configs_round_trip(tmp_path):
    cfgs = [oscar.OScaRConfig(), None, oscar.OScaRConfig(key_bits=4, value_bits=4,
                                                         norm_scope="head")]
    path = save_layer_configs(tmp_path / "plan.json", cfgs, 7.5, report={"x": 1})
    assert load_layer_configs(path) == cfgs
    with open(path) as f:
        data = json.load(f)
    assert data["format"] == "oscar-layer-configs" and data["version"] == 1
    assert data["num_layers"] == 3 and data["layers"][1] is None
    assert load_layer_configs(data) == cfgs


@pytest.mark.parametrize("change, match", [
    (dict(format="other"), "'format': expected 'oscar-layer-configs'"),
    (dict(version=2), "'version': expected 1"),
    (dict(num_layers=3), "'num_layers': expected 2"),
    (dict(layers=[]), "'layers': expected a non-empty list"),
    (dict(layers=[{"key_bits": 3}, None]), r"layers\[0\]: key_bits must be one of"),
    (dict(layers=[{"bits": 2}, None]), r"layers\[0\]: unknown OScaRConfig fields \['bits'\]"),
    (dict(layers=[None, 5]), r"layers\[1\]: expected an object"),
    (dict(bits_per_element="x"), "'bits_per_element': expected a positive number"),
])
def test_layer_configs_errors(change, match):
    data = {"format": "oscar-layer-configs", "version": 1, "num_layers": 2,
            "layers": [{}, None], "bits_per_element": 9.5}
    with pytest.raises(ValueError, match=match):
        load_layer_configs({**data, **change})


def test_layer_configs_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_layer_configs(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_layer_configs(bad)


# --- the command line -------------------------------------------------------------------------

def test_cli_report_json_plots(llama_dir, tmp_path, capsys):
    js, plots = tmp_path / "plan.json", tmp_path / "plots"
    rc = cli.main(["report", "--model", llama_dir, "--tokens", str(TOKENS), "--json", str(js),
                   "--plots", str(plots)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "| OScaR INT2 " in out and "Recommendation" in out and "random token ids" in out
    assert "quantize" in err  # the progress bar is on stderr
    with open(js) as f:
        data = json.load(f)  # strict JSON: allow_nan=False when written
    configs = load_layer_configs(js)
    assert len(configs) == data["num_layers"] == 2
    assert data["bits_per_element"] == pytest.approx(data["report"]["recommendation"]
                                                     ["bits_per_element"])
    assert {c["name"] for c in data["report"]["configs"]} == {n for n, _ in doctor.CONFIGS}
    for name in ("layer_errors.png", "key_norms_worst_layer.png", "pareto.png"):
        with open(plots / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plan_loads_into_the_integration(llama_dir, tmp_path):
    """The --json file (plan plus report) is what OScaRCache of the transformers integration
    takes as oscar_config; a plan with an unquantized layer too; the model then generates."""
    from oscar.integrations.transformers import OScaRCache

    rep = doctor.diagnose(llama_dir, tokens=TOKENS, progress=False)
    path = tmp_path / "plan.json"
    with open(path, "w") as f:
        json.dump(doctor.to_json(rep), f, allow_nan=False)
    configs = load_layer_configs(path)
    assert configs == rep.recommendation.configs
    model, ids, _, layers = _captured(llama_dir)
    assert OScaRCache(model.config, str(path)).layer_configs == configs
    for cfg, layer in zip(configs, layers):  # and a plain quantized cache of every layer
        if cfg is not None:
            assert oscar.quantize_kv(layer.k, layer.v, cfg).seq_len == TOKENS
    mixed = [None, *configs[1:]]
    save_layer_configs(tmp_path / "mixed.json", mixed, 9.0)
    cache = OScaRCache(model.config, str(tmp_path / "mixed.json"))
    assert cache.layer_configs == mixed
    model.set_attn_implementation("oscar")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation of past_key_values
        out = model.generate(torch.as_tensor(ids[:140])[None], past_key_values=cache,
                             max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 142)


def test_builtin_text_with_tokenizer(llama_tok_dir):
    config = _capture.load_config(llama_tok_dir)
    _, tok = _capture.load_model(llama_tok_dir, config, "cpu")
    assert tok is not None
    ids, src = _capture.token_ids(tok, config.vocab_size, 1000, None)
    assert ids.size == 1000 and "built-in public-domain prose" in src
    assert tok.decode(ids[:20].tolist()).startswith("Four score and seven")


def test_text_shorter_than_two_windows(llama_tok_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("A short text. " * 10)  # 140 bytes: 140 tokens of the byte tokenizer
    rc = cli.main(["report", "--model", llama_tok_dir, "--text", str(short)])
    _, err = capsys.readouterr()
    assert rc == 1 and "140 tokens, shorter than the 256" in err and "residual" in err


@pytest.mark.parametrize("argv, match", [
    (["--tokens", "300"], "need --model"),
    (["--model", "MODEL", "--tokens", "100"], "--tokens: expected an int >= 256"),
    (["--model", "MODEL", "--kv", "x.npz"], "not with --kv"),
    (["--model", "MODEL", "--text", "TEXT"], "the model has no tokenizer to encode it"),
])
def test_cli_argument_errors(llama_dir, argv, match, capsys):
    sub = {"MODEL": llama_dir, "TEXT": os.path.join(llama_dir, "config.json")}
    argv = [sub.get(a, a) for a in argv]
    assert cli.main(["report", *argv]) == 1
    assert match in capsys.readouterr().err


def test_not_a_causal_lm(tmp_path, capsys):
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=100))
    bert.save_pretrained(tmp_path / "bert")
    os.makedirs(tmp_path / "empty")
    for path, match in ((tmp_path / "bert", "not a causal LM (model_type 'bert'"),
                        (tmp_path / "empty", "not a Hugging Face model directory"),
                        (tmp_path / "nothing", "no such directory")):
        assert cli.main(["report", "--model", str(path)]) == 1
        assert match in capsys.readouterr().err


def test_output_paths_checked_before_the_computation(llama_dir, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("diagnose ran before the output paths were checked")

    monkeypatch.setattr(doctor, "diagnose", boom)
    cases = ((["--json", str(tmp_path / "no" / "plan.json")], "does not exist"),
             (["--json", str(tmp_path)], "is a directory"),
             (["--plots", __file__], "exists and is not a directory"))
    for extra, match in cases:
        assert cli.main(["report", "--model", llama_dir, *extra]) == 1
        assert match in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # matplotlib missing
    assert cli.main(["report", "--model", llama_dir, "--plots", str(tmp_path / "p")]) == 1
    assert "--plots needs matplotlib" in capsys.readouterr().err


def test_report_without_model_unchanged(capsys):
    rc = cli.main(["report", "--seq-len", "256", "--num-kv-heads", "2", "--num-q-heads", "4",
                   "--head-dim", "128"])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.startswith("synthetic TNI") and "| OScaR INT2 " in out
