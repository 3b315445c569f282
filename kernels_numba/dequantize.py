"""Dequantize one packed block back to the input domain: unpack, scale, un-rotate (keys and values).

Spec sheet
----------
Computes :func:`oscar.reference.block.dequantize_block` bit for bit:

    k_out[b, h, t, :] = H(norm[b, s, t] * (min + code * scale))     float32 [B, H, T, D]
    v_out[b, h, t, :] = H(min + code * scale)

each H (FWHT, then ``mul.rn`` by 1/sqrt(D)) only where the configuration rotates, the norm only
with token scaling. ``code * scale`` and ``* norm`` are ``mul.rn`` (never contracted into an FMA
with the following add), so every float32 operation is the reference's, in its order.

* Grid ``(T / 32, H, B)``, ``THREADS`` threads: a block owns one 32-token key tile of one
  (batch, head), for keys and values.
* Keys: thread p <-> (lane = p % 32, channel c = p // 32, + THREADS / 32 channels per step): a
  warp reads one 128-byte row ``k_codes[b, h, tile, w, 0:32]``; all lanes share the channel's
  (scale, min) (a broadcast). Values: thread p <-> (token p // D, channel p % D) row-major; the
  ``32 / bits`` threads of one word read it once (broadcast). Outputs are written row-major from
  the shared tile (coalesced for contiguous outputs).
* Shared memory: one float32 tile ``[32, D + 1]`` (33 KB at D = 256); the +1 pad keeps the
  lane-major writes of the key unpack free of bank conflicts.
* Limits: T a multiple of key_group_size; D in {32, 64, 128, 256}; H, B <= 65535.

Used by tests and by ``dequantize_kv``; decode attention never materializes this.
"""

from __future__ import annotations

import functools

from ..reference.hadamard import hadamard_scale
from ._compat import cuda, np
from .kernel_cache import jit, launch
from .common import check_threads, fwht_shared, mul_rn, value_code_location, value_param_location
from .quantize import PARAM_TYPES, TILE, check_block_arrays

#: Threads per block: 8 warps (see quantize.THREADS).
THREADS = 256


@functools.lru_cache(maxsize=None)
def _tile_writer(head_dim: int, rotate: bool, threads: int):
    """Device function: ``out[b, h, t0:t0+32, :] = H(tile)`` (or the tile itself), then barrier."""
    d = head_dim
    nt = threads
    hs = hadamard_scale(d)

    @cuda.jit(device=True)
    def write_tile(tile, out, b, h, t0, tid):
        if rotate:
            fwht_shared(tile, TILE, d, tid, nt)  # starts with a barrier
        else:
            cuda.syncthreads()
        p = tid
        while p < TILE * d:
            t = p // d
            c = p - t * d
            x = tile[t, c]
            if rotate:
                x = mul_rn(x, hs)
            out[b, h, t0 + t, c] = x
            p += nt
        cuda.syncthreads()  # the tile is refilled next

    return write_tile


@functools.lru_cache(maxsize=None)
def _dequantize_source(key_bits, value_bits, key_group_size, value_group_size, head_dim,
                       param_dtype, rotate_keys, scale_tokens, rotate_values, head_scope, threads):
    """(kernel function, signature) of the dequantize kernel for one configuration."""
    d = head_dim
    nt = threads
    k_cpw = 32 // key_bits
    d_pad = d + 1  # row stride of the shared tile: lane-major reads hit 32 different banks
    k_mask = (1 << key_bits) - 1
    v_words = d * value_bits // 32  # words per token row of v_codes
    v_mask = (1 << value_bits) - 1
    groups = d // value_group_size  # value groups per token
    write_keys = _tile_writer(d, rotate_keys, nt)
    write_values = _tile_writer(d, rotate_values, nt)

    def dequantize_kernel(k_codes, k_params, v_codes, v_params, norms, k_out, v_out):
        it = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        t0 = it * TILE
        kg = t0 // key_group_size
        s = h if head_scope else 0
        tile = cuda.shared.array((TILE, d_pad), np.float32)

        p = tid
        while p < TILE * d:
            lane = p % TILE
            c = p // TILE
            word = np.int64(k_codes[b, h, it, c // k_cpw, lane])
            code = (word >> (key_bits * (c % k_cpw))) & k_mask
            u = np.float32(k_params[b, h, kg, c, 1]) + mul_rn(
                np.float32(code), np.float32(k_params[b, h, kg, c, 0]))
            if scale_tokens:
                u = mul_rn(u, norms[b, s, t0 + lane])
            tile[lane, c] = u
            p += nt
        write_keys(tile, k_out, b, h, t0, tid)

        p = tid
        while p < TILE * d:
            t = p // d
            c = p - t * d
            f, sh = value_code_location(t, c, d, value_bits)  # the tiled layout
            word = np.int64(v_codes[b, h, t0 + f // v_words, f % v_words])
            code = (word >> sh) & v_mask
            g = c // value_group_size
            # the tiled order (docs/format.md 2c); the min is 8 rows after the scale
            pr, pg, pp = value_param_location(t, g, 0, groups)
            tile[t, c] = np.float32(v_params[b, h, t0 + pr + 8, pg, pp]) + mul_rn(
                np.float32(code), np.float32(v_params[b, h, t0 + pr, pg, pp]))
            p += nt
        write_values(tile, v_out, b, h, t0, tid)

    pt = PARAM_TYPES[param_dtype]
    sig = (f"void(uint32[:, :, :, :, :], {pt}[:, :, :, :, :], uint32[:, :, :, :], "
           f"{pt}[:, :, :, :, :], float32[:, :, :], float32[:, :, :, :], float32[:, :, :, :])")
    return dequantize_kernel, sig


def _dequantize_key(config, head_dim: int, threads: int = THREADS) -> tuple:
    return (config.key_bits, config.value_bits, config.key_group_size, config.value_group_size,
            head_dim, config.param_dtype, config.rotate_keys, config.scale_tokens,
            config.rotate_values, config.scale_tokens and config.norm_scope == "head", threads)


@functools.lru_cache(maxsize=None)
def _dequantize_kernel(key: tuple):
    fn, sig = _dequantize_source(*key)
    return jit(fn, sig, name="dequantize", key=key)


def dequantize_block(k_codes, k_params, v_codes, v_params, norms, k_out, v_out, config, stream=0,
                     *, threads: int = THREADS) -> None:
    """Packed block to float32 ``k_out, v_out [batch, num_kv_heads, seq_len, head_dim]``.

    Equals :func:`oscar.reference.block.dequantize_block` bit for bit. ``norms`` is the
    ``[B, S, T]`` token norms, or a float32 ``[1, 1, 1]`` placeholder without token scaling.
    ``threads`` (threads per block, a power of two >= 32) is a launch-configuration override for
    tests.
    """
    check_threads(threads)
    bsz, heads, seq, d = check_block_arrays(k_out, v_out, k_codes, k_params, v_codes, v_params,
                                            norms, config, "float32", "k_out", "v_out")
    if seq == 0 or bsz == 0 or heads == 0:
        return
    kernel = _dequantize_kernel(_dequantize_key(config, d, threads))
    launch(kernel, (seq // TILE, heads, bsz), threads, stream, k_codes, k_params, v_codes,
           v_params, norms, k_out, v_out)


def compile_signatures():
    """(name, python function, signature) of a representative set of kernels for compile checks."""
    from .quantize import _representative_configs

    for cfg, d, *_ in _representative_configs():
        key = _dequantize_key(cfg, d)
        fn, sig = _dequantize_source(*key)
        yield f"dequantize.dequantize{key}", fn, sig
