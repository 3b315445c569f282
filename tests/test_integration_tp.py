"""Tensor-parallel generation through transformers on CPU (issue 28's CPU part): two processes
under ``torchrun`` with the gloo backend, ``tp_plan="auto"``, each rank holding half of the KV
heads of a tiny random Llama (4 KV heads here).

* ``norm_scope="head"``: both ranks generate exactly the tokens of the single-process run with the
  same configuration (INT2, a prompt that is quantized and 40 decode steps crossing a flush).
* ``norm_scope="token"`` (the default): each rank raises ValueError naming norm_scope='head' (the
  token norm would cover only a rank's heads).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it for tp_plan

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "tp_worker.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, initializer_range=0.2,
        max_position_embeddings=512)).save_pretrained(d)
    return str(d)


def _run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(HERE))


def _torchrun():
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _records(stdout):
    """The workers' JSON records; two ranks writing at once can put two records on one line."""
    dec, out = json.JSONDecoder(), []
    for line in stdout.splitlines():
        i = line.find('{"rank"')
        while i >= 0:
            rec, end = dec.raw_decode(line, i)
            out.append(rec)
            i = line.find('{"rank"', end)
    return out


def test_two_ranks_equal_one_process_with_per_head_norms(model_dir):
    single = _run([sys.executable, WORKER, model_dir, "head"])
    assert single.returncode == 0, single.stderr[-3000:]
    (alone,) = _records(single.stdout)
    tp = _run(_torchrun() + ["--nproc_per_node", "2", "--master_port", "29517", WORKER,
                             model_dir, "head"])
    assert tp.returncode == 0, tp.stderr[-3000:]
    ranks = _records(tp.stdout)
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["tokens"] == alone["tokens"]


def test_token_norm_scope_is_rejected_under_tensor_parallelism(model_dir):
    tp = _run(_torchrun() + ["--nproc_per_node", "2", "--master_port", "29518", WORKER,
                             model_dir, "token"])
    assert tp.returncode != 0
    assert "holds 2 of the model's 4 KV heads" in tp.stderr
    assert "norm_scope='head'" in tp.stderr
