"""Worker of tests/test_integration_tp.py: generate with OScaRCache on a tiny Llama, alone or as
one rank of transformers' tensor parallelism (``torchrun``, gloo on CPU). Prints one JSON line
``{"rank": r, "tokens": [...]}``.

    python tests/tp_worker.py MODEL_DIR NORM_SCOPE            # one process
    torchrun --nproc_per_node 2 tests/tp_worker.py MODEL_DIR NORM_SCOPE
"""

import json
import os
import sys

import torch

import oscar
from oscar.integrations.transformers import OScaRCache
from transformers import LlamaForCausalLM

model_dir, scope = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
tp = dict(tp_plan="auto") if os.environ.get("WORLD_SIZE") else {}
model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="oscar", **tp)
ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))
cache = OScaRCache(model.config, oscar.OScaRConfig(residual_length=32, norm_scope=scope))
with torch.no_grad():
    out = model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=40, do_sample=False)
print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "tokens": out[:, 70:].tolist()}),
      flush=True)
