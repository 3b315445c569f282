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
