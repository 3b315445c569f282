"""Bit packing (reference/pack.py) against a loop-based packer written from the layout docs.

    k_codes[b, h, i, w, l] = OR_j code[b, h, 32*i + l, w*cpw + j] << (bits*j)
    v_codes: per 32-token tile, the slot order of docs/format.md ("Value tiles")
    v_params: per 32-token tile, the element order of docs/format.md ("Value param tiles")
"""

import numpy as np
import pytest

import oscar
from oscar.reference import (
    TILE_TOKENS,
    codes_per_word,
    pack_key_codes,
    pack_value_codes,
    pack_value_params,
    quantize_block,
    unpack_key_codes,
    unpack_value_codes,
    unpack_value_params,
    value_code_location,
    value_param_location,
)
from oscar.reference.block import rotate_and_scale_keys
from oscar.reference.hadamard import hadamard_transform
from oscar.reference.quantize import quantize_keys, quantize_values

from helpers_reference import make_kv, slow_pack_keys, slow_pack_value_params, slow_pack_values

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
@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (2, 3, 64, 32), (1, 2, 96, 64), (1, 1, 32, 128),
                                   (1, 1, 32, 256)])
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
    vw = rng.integers(0, 2**32, (2, 1, 64, 64 * bits // 32), dtype=np.uint64).astype(np.uint32)
    codes = unpack_value_codes(vw, bits)
    assert codes.max() <= 2**bits - 1
    assert np.array_equal(pack_value_codes(codes, bits), vw)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_single_code_extraction_formula(bits, head_dim):
    # the kernels' reads: keys (word[c // cpw] >> (bits * (c % cpw))) & (2**bits - 1); values at
    # value_code_location(t % 32, c) of the token's tile, whose words are 32 flat rows
    rng = np.random.default_rng(3)
    codes = _codes(rng, (1, 1, 64, head_dim), bits)
    kw = pack_key_codes(codes, bits)
    vw = pack_value_codes(codes, bits)
    row = head_dim * bits // 32
    flat = vw.reshape(2, 32 * row)
    cpw, mask = codes_per_word(bits), (1 << bits) - 1
    for t in (0, 1, 4, 8, 15, 16, 31, 32, 63):
        for c in (0, 1, 7, 8, 15, 16, cpw - 1, cpw, head_dim - 1):
            i, lane = divmod(t, TILE_TOKENS)
            key = (int(kw[0, 0, i, c // cpw, lane]) >> (bits * (c % cpw))) & mask
            word, shift = value_code_location(lane, c, head_dim, bits)
            val = (int(flat[i, word]) >> int(shift)) & mask
            assert key == val == codes[0, 0, t, c]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("head_dim", [32, 128, 256])
def test_value_location_is_a_bijection(bits, head_dim):
    t, c = np.meshgrid(np.arange(32), np.arange(head_dim), indexing="ij")
    word, shift = value_code_location(t, c, head_dim, bits)
    assert word.min() == 0 and word.max() == head_dim * bits - 1
    assert shift.min() == 0 and shift.max() == 32 - bits and np.all(shift % bits == 0)
    assert len(set(zip(word.ravel().tolist(), shift.ravel().tolist()))) == 32 * head_dim
    # the low / high 16 bits of a word hold the same channels of tokens t and t + 4
    lo = shift < 16
    assert np.all((t[lo] // 4) % 2 == 0)
    w2, s2 = value_code_location(t[lo] + 4, c[lo], head_dim, bits)
    assert np.array_equal(w2, word[lo]) and np.array_equal(s2, shift[lo] + 16)


@pytest.mark.parametrize("groups", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_pack_value_params_matches_loop_packer(groups, dtype):
    rng = np.random.default_rng(groups)
    params = rng.standard_normal((2, 3, 64, groups, 2)).astype(dtype)
    packed = pack_value_params(params)
    assert packed.dtype == dtype and packed.shape == params.shape and packed.flags.c_contiguous
    assert np.array_equal(packed, slow_pack_value_params(params))
    assert np.array_equal(unpack_value_params(packed), params)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_value_param_location_pairs_tokens_t_and_t_plus_4(groups):
    t, j, part = np.meshgrid(np.arange(32), np.arange(groups), np.arange(2), indexing="ij")
    idx = value_param_location(t, j, part, groups)
    assert sorted(idx.ravel().tolist()) == list(range(64 * groups))  # a permutation of the tile
    # the float16x2 word idx // 2 holds tokens t (low half) and t + 4 (high half), same (j, part)
    lo = idx % 2 == 0
    assert np.all((t[lo] // 4) % 2 == 0)
    assert np.array_equal(value_param_location(t[lo] + 4, j[lo], part[lo], groups), idx[lo] + 1)
    # a min sits 16 * groups elements (8 tile rows) after its scale: the kernels use that
    assert np.array_equal(idx[..., 1], idx[..., 0] + 16 * groups)
    # the decode kernel's reads: lane column t4 of 16-token block kb finds the scales of tokens
    # 16 kb + t4 + {0, 4 | 8, 12} of every group in 2 * groups consecutive words, its mins 8 *
    # groups words further
    for kb in range(2):
        for t4 in range(4):
            base = kb * 16 * groups + t4 * 2 * groups
            for jj in range(groups):
                for pair in range(2):
                    tok = 16 * kb + 8 * pair + t4
                    assert value_param_location(tok, jj, 0, groups) // 2 == base + 2 * jj + pair
                    assert (value_param_location(tok, jj, 1, groups) // 2
                            == base + 8 * groups + 2 * jj + pair)


def test_value_param_location_worked_example():
    # docs/format.md section 2c, D = 128, gv = 32 (4 groups)
    assert value_param_location(21, 3, 0, 4) == 157
    assert value_param_location(17, 3, 0, 4) == 156  # the other half of the same word
    assert value_param_location(21, 3, 1, 4) == 221  # its min, 16 * 4 elements on
    params = np.zeros((1, 1, 32, 4, 2), np.float32)
    params[0, 0, 21, 3, 0] = 1.0
    assert pack_value_params(params)[0, 0, 19, 2, 1] == 1.0


def test_value_param_tiles_reject_partial_tiles():
    with pytest.raises(ValueError, match="T % 32"):
        pack_value_params(np.zeros((1, 1, 33, 1, 2), np.float16))
    with pytest.raises(ValueError, match="T % 32"):
        unpack_value_params(np.zeros((1, 1, 32, 1, 3), np.float16))


def test_value_layout_rejects_partial_tiles():
    with pytest.raises(ValueError, match="T % 32"):
        pack_value_codes(np.zeros((1, 1, 33, 32), np.uint8), 2)
    with pytest.raises(ValueError, match="T % 32"):
        unpack_value_codes(np.zeros((1, 1, 33, 2), np.uint32), 2)


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
    assert np.array_equal(block.k_params, kp)
    assert np.array_equal(block.v_params, slow_pack_value_params(vp))
    assert np.array_equal(block.norms, norms)
