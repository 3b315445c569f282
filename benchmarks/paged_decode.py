"""Paged vs contiguous decode on the GPU (issue 27): what the interim paged decode costs.

    python benchmarks/paged_decode.py [--cases 8x32768,16x32768] [--page-size 128]

For each (batch, seq_len), Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, D = 128,
bfloat16), the same tokens go into a contiguous cache (``oscar.quantize_kv``) and into a
``PagedKVCache`` (one write per sequence, pages in reversed order so no sequence is contiguous
in the pool). Reports the device time of one decode step (q_len 1) of each, L2 flushed, the
ratio, and the largest output difference. The paged decode is the interim path of
oscar/_paged_cuda.py (a gather of every page into a workspace, then the contiguous kernels), so
expect it to move about twice the bytes; the issue's goal (within 5%) needs the block-table
kernel (docs/serving.md, section 5).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def main(argv=None):
    import torch

    import oscar
    from cases import HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, decode_inputs
    from gpu_timing import time_cuda
    from oscar.paged import PagedKVCache, slot_mapping

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="8x32768", help="comma-separated BATCHxSEQ_LEN")
    ap.add_argument("--page-size", type=int, default=128)
    args = ap.parse_args(argv)
    p = args.page_size
    print(f"{'case':>12} {'contiguous ms':>14} {'paged ms':>9} {'paged/contig':>13} "
          f"{'max |diff|':>11}")
    for case in args.cases.split(","):
        b, t = (int(x) for x in case.split("x"))
        q, k, v = decode_inputs(b, t, seed=0)
        cont = oscar.quantize_kv(k, v, max_seq_len=t + 128, num_q_heads=NUM_Q_HEADS)
        per_seq = -(-t // p)
        paged = PagedKVCache.empty(b * per_seq, p, NUM_KV_HEADS, HEAD_DIM, max_seqs=b,
                                   dtype="bfloat16", backend="numba", device="cuda")
        table = np.zeros((b, per_seq), np.int32)
        for s in range(b):
            table[s] = paged.allocate(per_seq)[::-1]
            paged.reset(s)
            paged.write(k[s].transpose(0, 1), v[s].transpose(0, 1),
                        slot_mapping(table[s], np.arange(t), p), np.full(t, s, np.int32))
        paged.check()
        bt = torch.from_numpy(table).cuda()
        out_c = oscar.decode_attention(q, cont)
        out_p = paged.decode_attention(q, bt)
        diff = (out_c.float() - out_p.float()).abs().max().item()
        ms_c = time_cuda(lambda: oscar.decode_attention(q, cont))
        ms_p = time_cuda(lambda: paged.decode_attention(q, bt))
        print(f"{case:>12} {ms_c:14.3f} {ms_p:9.3f} {ms_p / ms_c:13.2f} {diff:11.3g}")
        del cont, paged, q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
