"""``oscar report`` as a new user meets it (issue 23, item 6): progress on stderr, outputs checked
before the computation, options that do not apply are errors, errors name real options."""

import json
import sys

import numpy as np
import pytest

from oscar import cli, report
from oscar.synthetic import SyntheticKV

SMALL = ["report", "--seq-len", "80", "--num-kv-heads", "2", "--head-dim", "32",
         "--num-q-heads", "4"]


def test_report_shows_progress_on_stderr(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    assert cli.main([*SMALL, "--json", str(out_json)]) == 0
    out, err = capsys.readouterr()
    assert "[1/" in err and "OScaR INT4" in err  # one line per configuration, on stderr
    assert "[1/" not in out and "| OScaR INT2" in out
    assert "skipped OScaR INT2 g128: value_group_size (128) must divide head_dim (32)" in err
    assert json.loads(out_json.read_text())["rows"]


@pytest.fixture
def no_evaluate(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the computation ran before the output check")
    monkeypatch.setattr(report, "evaluate", fail)


def test_unwritable_json_fails_before_computing(capsys, tmp_path, no_evaluate):
    assert cli.main([*SMALL, "--json", str(tmp_path / "missing" / "r.json")]) == 1
    assert "--json: cannot write" in capsys.readouterr().err
    assert cli.main([*SMALL, "--json", str(tmp_path)]) == 1  # a folder
    assert "--json: cannot write" in capsys.readouterr().err


def test_unwritable_plots_fails_before_computing(capsys, tmp_path, no_evaluate):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main([*SMALL, "--plots", str(blocker / "plots")]) == 1
    assert "--plots: cannot write into" in capsys.readouterr().err


def test_missing_matplotlib_fails_before_computing(capsys, monkeypatch, tmp_path, no_evaluate):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main([*SMALL, "--plots", str(tmp_path)]) == 1
    assert "--plots needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--seq-len", "--batch", "--num-kv-heads", "--head-dim",
                                    "--num-sinks", "--seed"])
def test_synthetic_options_with_kv_are_errors(capsys, tmp_path, option, no_evaluate):
    path = tmp_path / "kv.npz"
    np.savez(path, k=np.ones((1, 2, 40, 32), np.float32), v=np.ones((1, 2, 40, 32), np.float32))
    assert cli.main(["report", "--kv", str(path), option, "2"]) == 1
    assert f"{option}: only for the synthetic data; with --kv" in capsys.readouterr().err


def test_errors_name_command_line_options(capsys, no_evaluate):
    assert cli.main(["report", "--seq-len", "2"]) == 1
    err = capsys.readouterr().err
    assert "--num-sinks: expected 0 <= --num-sinks <= --seq-len (2), got 4" in err
    assert "num_sinks" not in err
    assert cli.main(["report", "--seq-len", "40", "--num-sinks", "1", "--num-q-heads", "3"]) == 1
    assert "--num-q-heads" in capsys.readouterr().err


def test_sinks_without_attention_are_reported_not_zeros():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 1, 32)).astype(np.float32)
    k = rng.standard_normal((1, 2, 64, 32)).astype(np.float32)
    k[:, :, 0] = -20 * q[:, :, 0]  # token 0 gets exp(-20 |q|^2 / sqrt(32)): no attention
    data = SyntheticKV(k=k, v=rng.standard_normal(k.shape).astype(np.float32), q=q,
                       sink_positions=np.array([0]), description="test")
    rows, extras = report.evaluate(data, configs=report.CONFIGS[:2])
    assert extras["sink_mass_fp"] < report.SINK_MASS_MIN
    assert "sinks receive almost no attention" in extras["sink_note"]
    assert all(np.isnan(r.sink_attn_err) for r in rows)
    assert report.format_table(rows).splitlines()[2].rstrip(" |").endswith("-")


# --- oscar warmup, oscar kernel-cache ---------------------------------------------------------


def _config_json(tmp_path, name, **cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_warmup_dry_run_reads_the_model_config(capsys, tmp_path):
    llama = _config_json(tmp_path, "llama", model_type="llama", num_attention_heads=32,
                         num_key_value_heads=8, hidden_size=4096, torch_dtype="bfloat16")
    assert cli.main(["warmup", "--model", str(llama), "--q-lens", "1,2,3", "--batch-sizes",
                     "1,8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 KV heads x 128, 32 query heads, bfloat16" in out
    assert "batch sizes [1, 8]; q_lens [1, 2, 3]; 1 configuration" in out and "key_bits=2" in out
    # a multimodal config's text_config, an explicit head_dim, the file itself, overrides
    vlm = _config_json(tmp_path, "vlm", model_type="qwen2_5_vl", torch_dtype="float16",
                       text_config=dict(num_attention_heads=16, num_key_value_heads=2,
                                        head_dim=64, hidden_size=2048))
    assert cli.main(["warmup", "--model", str(vlm / "config.json"), "--key-bits", "4",
                     "--value-bits", "4", "--dtype", "float32", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 KV heads x 64, 16 query heads, float32" in out and "key_bits=4" in out
    # a per-layer plan: its distinct quantized configurations (INT2 twice, INT4, one dense)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "oscar-layer-configs", "version": 1, "num_layers": 4,
                                "layers": [{"key_bits": 2}, {"key_bits": 4, "value_bits": 4},
                                           None, {"key_bits": 2}]}))
    assert cli.main(["warmup", "--model", str(llama), "--layer-configs", str(plan),
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 configurations" in out and out.count("OScaRConfig(") == 2
    assert cli.main(["warmup", "--model", str(llama), "--layer-configs", str(plan),
                     "--key-bits", "4", "--dry-run"]) == 1
    assert "--layer-configs fixes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["warmup"], "expected --model, or --num-kv-heads and --head-dim"),
    (["warmup", "--model", "/nonexistent"], "--model: expected a model directory"),
    (["warmup", "--num-kv-heads", "8", "--head-dim", "128", "--q-lens", "1,0"],
     "--q-lens: expected comma-separated positive ints"),
    (["warmup", "--num-kv-heads", "8", "--head-dim", "128", "--batch-sizes", "x"],
     "--batch-sizes: expected"),
    (["warmup", "--num-kv-heads", "8", "--head-dim", "96"], "head_dim"),
])
def test_warmup_bad_arguments(capsys, argv, match):
    assert cli.main([*argv, "--dry-run"]) == 1
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("cfg, match", [
    (dict(hidden_size=100), "no positive num_attention_heads"),
    (dict(num_attention_heads=8, num_key_value_heads=3, head_dim=64),
     "num_key_value_heads a positive divisor"),
    (dict(num_attention_heads=8, head_dim="64"), "positive int head_dim"),
    (dict(num_attention_heads=8, hidden_size=100), "neither head_dim nor a hidden_size"),
])
def test_warmup_bad_model_config(capsys, tmp_path, cfg, match):
    bad = _config_json(tmp_path, "bad", model_type="x", **cfg)
    assert cli.main(["warmup", "--model", str(bad), "--dry-run"]) == 1
    assert match in capsys.readouterr().err


def test_warmup_without_a_gpu_is_a_clear_error(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: warmup would run")
    assert cli.main(["warmup", "--num-kv-heads", "8", "--head-dim", "128"]) == 1
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_kernel_cache_info_and_clear(capsys, tmp_path, monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setenv("OSCAR_CACHE_DIR", str(tmp_path / "kc"))
    (tmp_path / "kc" / "ab").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "kc" / "ab" / f"e{i}.okc").write_bytes(b"x" * 10)
    assert cli.main(["kernel-cache"]) == 0
    out = capsys.readouterr().out
    assert f"directory {tmp_path / 'kc'}" in out and "entries 3" in out and "bytes 30" in out
    assert cli.main(["kernel-cache", "--clear"]) == 0
    out = capsys.readouterr().out
    assert "removed 3 compiled kernels" in out and "entries 0" in out
