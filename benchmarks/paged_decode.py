"""Paged vs contiguous decode on the GPU (issue 27): the paged v3 kernel, the interim gather.

    python benchmarks/paged_decode.py [--cases 8x32768,16x32768,8x131072,16x131072]
                                      [--page-size 128]

For each (batch, seq_len), Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, D = 128,
bfloat16), the same tokens go into a contiguous cache (``oscar.quantize_kv``) and into a
``PagedKVCache`` (one write per sequence, pages in reversed order so no sequence is contiguous
in the pool). Device time of one decode step (q_len 1), L2 flushed, median:

* ``contig``: ``oscar.decode_attention`` on the contiguous cache (the reference point);
* ``paged v3``: the paged v3 kernel's launches alone (``attention.decode_launches`` with the
  block table, arguments built once, as a CUDA-graph step would replay them): the issue's
  goal is this within 5 % of ``contig`` at B = 8/16, 32K and 128K;
* ``paged api``: ``PagedKVCache.decode_attention`` (paged v3 plus its per-call host work: the
  block table and lengths uploads, the checks' copy back of them);
* ``gather``: the interim path (pages gathered into a workspace, then the contiguous kernels),
  which the configurations v3 does not take still use.

The last column is the largest |paged v3 - contig| output difference (both bfloat16).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def _paged_step(paged, q, table):
    """A function launching the paged v3 kernels of one decode step (arguments prepared once)."""
    import torch

    from oscar._cuda_bridge import _Launch
    from oscar.kernels_numba import attention as A
    from oscar.kernels_numba.kernel_cache import launch

    st = paged._store
    b, hq, q_len, d = q.shape
    h, p = st.layout.num_kv_heads, st.layout.page_size
    rows = paged._rows(table, None, b)
    qls = np.array([r[2] for r in rows])
    rls = np.array([r[3] for r in rows])
    lengths = A.uniform_lengths(b, 0, 0)
    lengths[:, A.LEN_QUANTIZED] = qls
    lengths[:, A.LEN_RESIDUAL] = rls
    d_len = torch.from_numpy(lengths).cuda()
    d_tab = torch.from_numpy(np.ascontiguousarray(table)).cuda()
    qmax, rmax = int(qls.max()), int(rls.max())
    nsplit = A.plan_splits(st.config, b, h, d, hq // h, q_len, "bfloat16", st.dtype, qmax, rmax,
                           A._num_sms(), page_size=p)
    work = {n: torch.zeros(sh, dtype=torch.float32 if A.WORKSPACE_DTYPES[n] == np.float32
                           else torch.int32, device="cuda")
            for n, sh in A.workspace_shapes(b, hq, q_len, d, nsplit).items()}
    out = torch.empty(b, hq, q_len, d, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(b, hq, q_len, dtype=torch.float32, device="cuda")
    with _Launch(q.device):  # Numba views in the device's context
        views = st.section_views()
        nb = st.mem.nb
        args = (nb(q.contiguous().view(torch.int16)), views["k_codes"], views["k_params"],
                views["v_codes"], views["v_params"], views["norms"], nb(st.k_res[:b]),
                nb(st.v_res[:b]), nb(out.view(torch.int16)), nb(lse), {n: nb(w) for n, w in
                                                                       work.items()},
                st.config, 1.0 / np.sqrt(d), qmax, rmax, "bfloat16", "bfloat16", nsplit, nb(d_len))
        A.decode_attention(*args, block_table=nb(d_tab), page_size=p)  # checks once
        launches = A.decode_launches(*args, block_table=nb(d_tab), page_size=p)
    keep = (d_len, d_tab, work, out, lse)

    def step():
        with _Launch(q.device) as stream:
            for kernel, grid, block, a, _names in launches:
                launch(kernel, grid, block, stream, *a)
        return keep

    return step, out, nsplit


def main(argv=None):
    import torch

    import oscar
    from cases import HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, decode_inputs
    from gpu_timing import time_cuda
    from oscar.paged import PagedKVCache, slot_mapping

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="8x32768,16x32768,8x131072,16x131072",
                    help="comma-separated BATCHxSEQ_LEN")
    ap.add_argument("--page-size", type=int, default=128)
    args = ap.parse_args(argv)
    p = args.page_size
    print(f"{'case':>12} {'contig ms':>10} {'paged v3':>9} {'v3/contig':>10} {'paged api':>10} "
          f"{'gather':>8} {'gather/contig':>14} {'splits':>6} {'max |diff|':>11}")
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
        del k, v
        bt = torch.from_numpy(table).cuda()
        step, out_v3, nsplit = _paged_step(paged, q, table)
        out_c = oscar.decode_attention(q, cont)
        step()
        torch.cuda.synchronize()
        diff = (out_c.float() - out_v3.float()).abs().max().item()
        st = paged._store
        rows = paged._rows(table, None, b)
        ms_c = time_cuda(lambda: oscar.decode_attention(q, cont))
        ms_v3 = time_cuda(step)
        ms_api = time_cuda(lambda: paged.decode_attention(q, bt))
        ms_g = time_cuda(lambda: st._decode_gather(q, rows, 1.0 / np.sqrt(HEAD_DIM), "bfloat16"))
        print(f"{case:>12} {ms_c:10.3f} {ms_v3:9.3f} {ms_v3 / ms_c:10.3f} {ms_api:10.3f} "
              f"{ms_g:8.3f} {ms_g / ms_c:14.2f} {nsplit:6d} {diff:11.3g}", flush=True)
        del cont, paged, q, st
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
