"""Bit packing (reference/pack.py) against a loop-based packer written from the layout docs.

    k_codes[b, h, i, w, l] = OR_j code[b, h, 32*i + l, w*cpw + j] << (bits*j)
    v_codes[b, h, t, w]    = OR_j code[b, h, t, w*cpw + j]        << (bits*j)
"""

import numpy as np
import pytest

import oscar
from oscar.reference import (
    TILE_TOKENS,
    codes_per_word,
    pack_key_codes,
    pack_value_codes,
    quantize_block,
    unpack_key_codes,
    unpack_value_codes,
)
from oscar.reference.block import rotate_and_scale_keys
from oscar.reference.hadamard import hadamard_transform
from oscar.reference.quantize import quantize_keys, quantize_values

from helpers_reference import make_kv, slow_pack_keys, slow_pack_values

BITS = [2, 4, 8]


def _codes(rng, shape, bits):
    return rng.integers(0, 2**bits, shape).astype(np.uint8)


@pytest.mark.parametrize("bits", BITS)
def test_codes_per_word(bits):
    assert codes_per_word(bits) * bits == 32
    assert TILE_TOKENS == 32


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (2, 3, 64, 32), (1, 2, 96, 64)])
def test_pack_keys_matches_loop_packer(bits, shape):
    rng = np.random.default_rng(bits + shape[2])
    codes = _codes(rng, shape, bits)
    words = pack_key_codes(codes, bits)
    b, h, t, d = shape
    assert words.dtype == np.uint32 and words.flags.c_contiguous
    assert words.shape == (b, h, t // 32, d * bits // 32, 32)
    assert np.array_equal(words, slow_pack_keys(codes, bits))
    assert np.array_equal(unpack_key_codes(words, bits), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 32), (2, 3, 5, 32), (1, 2, 33, 64)])
def test_pack_values_matches_loop_packer(bits, shape):
    rng = np.random.default_rng(bits + shape[2])
    codes = _codes(rng, shape, bits)
    words = pack_value_codes(codes, bits)
    b, h, t, d = shape
    assert words.dtype == np.uint32 and words.flags.c_contiguous
    assert words.shape == (b, h, t, d * bits // 32)
    assert np.array_equal(words, slow_pack_values(codes, bits))
    assert np.array_equal(unpack_value_codes(words, bits), codes)


@pytest.mark.parametrize("bits", BITS)
def test_every_word_unpacks_and_repacks(bits):
    # all 32 bits of a word are payload: any uint32 pattern round-trips through unpack/pack
    rng = np.random.default_rng(bits)
    kw = rng.integers(0, 2**32, (2, 1, 2, 64 * bits // 32, 32), dtype=np.uint64).astype(np.uint32)
    kw[0, 0, 0, 0, :2] = [0, 0xFFFFFFFF]
    assert np.array_equal(pack_key_codes(unpack_key_codes(kw, bits), bits), kw)
    vw = rng.integers(0, 2**32, (2, 1, 7, 64 * bits // 32), dtype=np.uint64).astype(np.uint32)
    codes = unpack_value_codes(vw, bits)
    assert codes.max() <= 2**bits - 1
    assert np.array_equal(pack_value_codes(codes, bits), vw)


@pytest.mark.parametrize("bits", BITS)
def test_single_channel_extraction_formula(bits):
    # the docstring's kernel-side read: (word[c // cpw] >> (bits * (c % cpw))) & (2**bits - 1)
    rng = np.random.default_rng(3)
    codes = _codes(rng, (1, 1, 64, 32), bits)
    kw = pack_key_codes(codes, bits)
    vw = pack_value_codes(codes, bits)
    cpw, mask = codes_per_word(bits), (1 << bits) - 1
    for t in (0, 1, 31, 32, 63):
        for c in (0, 1, cpw - 1, cpw, 31):
            i, lane = divmod(t, TILE_TOKENS)
            key = (int(kw[0, 0, i, c // cpw, lane]) >> (bits * (c % cpw))) & mask
            val = (int(vw[0, 0, t, c // cpw]) >> (bits * (c % cpw))) & mask
            assert key == val == codes[0, 0, t, c]


@pytest.mark.parametrize("key_bits,value_bits", [(2, 2), (4, 2), (8, 4), (2, 8)])
def test_block_stores_loop_packed_codes(key_bits, value_bits):
    # quantize_block = rotate/scale + per-group codes + the documented packing, end to end
    cfg = oscar.OScaRConfig(key_bits=key_bits, value_bits=value_bits, residual_length=32)
    k, v = make_kv(2, 2, 64, 32, seed=key_bits * 10 + value_bits)
    block = quantize_block(k, v, cfg)
    u, norms = rotate_and_scale_keys(k, cfg)
    kc, kp = quantize_keys(u, key_bits, cfg.key_group_size, cfg.param_dtype)
    vc, vp = quantize_values(hadamard_transform(v), value_bits, cfg.value_group_size,
                             cfg.param_dtype)
    assert np.array_equal(block.k_codes, slow_pack_keys(kc, key_bits))
    assert np.array_equal(block.v_codes, slow_pack_values(vc, value_bits))
    assert np.array_equal(block.k_params, kp) and np.array_equal(block.v_params, vp)
    assert np.array_equal(block.norms, norms)
