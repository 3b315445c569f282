"""Where does a decode step spend its time? Graph-replay device time (L2 flushed) of each piece
of one step, each captured alone: the split kernel (its unfused variant, with the residual blocks
where ``residual_block_rows`` puts them; ``split(res0)``: with no residual token), the merge
kernel (reading the residual blocks' partial or scoring the residual; ``merge(res0)``: no
residual), both kernels, the whole call (``full``: what ``oscar.decode_attention`` runs, fused
where it fuses), and torch SDPA bf16 on the same tokens; plus an empty kernel (the timing floor).
Llama-3.1-8B shapes, 127 residual tokens. H200 results: benchmarks/RESULTS.md.

    python benchmarks/decode_pieces.py
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oscar
from gpu_timing import time_graph, sdpa_bf16
from oscar.kernels_numba import attention as A
from numba import cuda

def pieces(B, T, res=127):
    torch.manual_seed(0)
    k = torch.randn(B, 8, T + res, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    cache = oscar.quantize_kv(k, v)
    st = cache._store
    out_full = lambda: oscar.decode_attention(q, cache)
    t_full = time_graph(out_full) * 1e3
    t_sdpa = time_graph(lambda: sdpa_bf16(q, k, v)) * 1e3
    d = 128
    splits = A.plan_splits(st.config, B, 8, d, 4, 1, "bfloat16", st.dtype, st.quantized_len,
                           st.residual_len, st._num_sms)
    bufs = st._decode_buffers(q, splits)
    qn = st._q_view(q)
    skey = A._split_key(st.config, d, 4, 1, "bfloat16", st.dtype)
    split = A._split_kernel(*skey)
    merge = A._merge_kernel(*A._merge_key(st.config, d, "bfloat16", st.dtype, "bfloat16"))
    out = torch.empty_like(q)
    out_nb = cuda.as_cuda_array(out.view(torch.int16))
    ws = bufs["ws_nb"]
    sc = np.float32(128 ** -0.5)
    ql, rl, ns = np.int32(st.quantized_len), np.int32(st.residual_len), np.int32(splits)
    rows = A.residual_block_rows(skey, B, 8, int(rl), splits)  # residual blocks' rows of the grid
    def run_split(rl=rl, rows=rows):
        s = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        split[(B * 8, rows + splits), 128, s](qn, st.nb["k_codes"], st.nb["k_params"],
            st.nb["v_codes"], st.nb["v_params"], st.nb["norms"], st.k_res_nb, st.v_res_nb,
            ws["split_max"], ws["split_sum"], ws["split_acc"], sc, ql, rl, ns, np.int32(rows),
            out_nb, bufs["lse_nb"], bufs["ws_nb"]["split_count"], np.int32(0))  # not fused
    def run_merge(rl=rl):
        s = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        slot = np.int32(1 if rows and rl > 0 else 0)  # the residual blocks' partial
        merge[B * 32, 128, s](qn, st.k_res_nb, st.v_res_nb, ws["split_max"], ws["split_sum"],
            ws["split_acc"], out_nb, bufs["lse_nb"], sc, ql, rl, ns, slot)
    t_split = time_graph(run_split) * 1e3
    t_split0 = time_graph(lambda: run_split(np.int32(0), 0)) * 1e3
    t_merge = time_graph(run_merge) * 1e3
    t_merge0 = time_graph(lambda: run_merge(np.int32(0))) * 1e3
    t_both = time_graph(lambda: (run_split(), run_merge())) * 1e3
    print(f"B={B} T={T} splits={splits} residual block rows={rows} full={t_full:.1f} "
          f"split={t_split:.1f} "
          f"split(res0)={t_split0:.1f} merge={t_merge:.1f} "
          f"merge(res0)={t_merge0:.1f} split+merge={t_both:.1f} sdpa={t_sdpa:.1f} us",
          flush=True)

@cuda.jit
def empty(x):
    pass
xx = cuda.device_array(1, np.float32)
def run_empty():
    s = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    empty[1, 32, s](xx)
print(f"empty kernel {time_graph(run_empty)*1e3:.1f} us; two empties "
      f"{time_graph(lambda: (run_empty(), run_empty()))*1e3:.1f} us", flush=True)
for B, T in ((1, 128), (1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768)):
    pieces(B, T)
