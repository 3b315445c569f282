"""Benchmark shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, head_dim 128)."""

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128

#: (batch, seq_len) of the decode targets of issue 4
DECODE_CASES = [(1, 4096), (1, 32768), (8, 32768), (8, 131072), (16, 131072)]
#: reduced set for quick runs
QUICK_CASES = [(1, 4096), (1, 32768), (8, 32768)]


def decode_inputs(batch, seq_len, seed):
    """Random bfloat16 ``q [batch, 32, 1, 128]`` and ``k, v [batch, 8, seq_len, 128]``, on the
    GPU."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(batch, NUM_KV_HEADS, seq_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                    generator=g)
    v = torch.randn_like(k)
    q = torch.randn(batch, NUM_Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                    generator=g)
    return q, k, v
