"""Benchmark shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, head_dim 128)."""

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128

#: (batch, seq_len) of the decode targets of issue 4
DECODE_CASES = [(1, 4096), (1, 32768), (8, 32768), (8, 131072), (16, 131072)]
#: reduced set for quick runs
QUICK_CASES = [(1, 4096), (1, 32768), (8, 32768)]
