"""Bit packing of codes into uint32 words, in the layout of docs/format.md.

Keys: inside a word, code j (j = 0 .. 32/bits - 1) sits at bits ``[bits*j, bits*j + bits)``,
and the codes of one word are ``32/bits`` consecutive channels of one token, so channel ``c`` of a
token is ``(word[c // cpw] >> (bits * (c % cpw))) & (2**bits - 1)``. Keys are tiled by 32 tokens
(one warp) so that a warp's load of word w reads 32 consecutive uint32 (128 bytes, one coalesced
transaction) holding word w of 32 tokens:

    k_codes[b, h, i, w, l]  = word w (channels w*cpw .. w*cpw+cpw-1) of token 32*i + l

Values are tiled by 32 tokens too, in the order the tensor-core decode kernel's threads read them
(docs/format.md, "Value tiles"): the ``32 * D * bits / 32`` words of tile i are the rows
``32*i .. 32*i + 31`` of ``v_codes[b, h, :, :]`` taken as one flat run, and
:func:`value_code_location` says which word and bit hold code (token, channel) of a tile. A word's
low and high 16 bits hold the same channels of two tokens (4 apart), so one AND with a mask turns
one channel of both tokens into the two float16 halves of an ``mma`` operand.

Value params (one (scale, min) per token and value group) are tiled the same way
(docs/format.md, "Value param tiles"): the ``32 * (D/gv) * 2`` elements of tile i are the rows
``32*i .. 32*i + 31`` of ``v_params[b, h, :, :, :]`` taken as one flat run, and
:func:`value_param_location` says which element holds (token, group, scale or min). The scales of
tokens ``t`` and ``t + 4`` are adjacent (one float16x2 word), so the decode kernel multiplies a
word of probabilities by a word of scales with no byte shuffling.
"""

from __future__ import annotations

import numpy as np

#: Tokens per key tile: one warp reads one word of 32 consecutive tokens in one transaction.
TILE_TOKENS = 32


def codes_per_word(bits: int) -> int:
    """How many codes of ``bits`` bits one uint32 word holds."""
    return 32 // bits


def _pack_last(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``codes[..., D]`` (uint8) into ``uint32[..., D * bits // 32]``, channel-ordered."""
    cpw = codes_per_word(bits)
    c = codes.astype(np.uint32).reshape(*codes.shape[:-1], codes.shape[-1] // cpw, cpw)
    shifts = (np.arange(cpw, dtype=np.uint32) * np.uint32(bits))
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint32)


def _unpack_last(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_last`: ``uint32[..., W]`` to ``uint8[..., W * 32 // bits]``."""
    cpw = codes_per_word(bits)
    shifts = (np.arange(cpw, dtype=np.uint32) * np.uint32(bits))
    mask = np.uint32((1 << bits) - 1)
    c = (words[..., None] >> shifts) & mask
    return c.reshape(*words.shape[:-1], words.shape[-1] * cpw).astype(np.uint8)


def pack_key_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``uint8 [B, H, T, D]`` key codes to ``uint32 [B, H, T/32, D*bits/32, 32]`` (T % 32 == 0)."""
    b, h, t, d = codes.shape
    words = _pack_last(codes, bits)  # [B, H, T, W]
    w = words.shape[-1]
    tiles = words.reshape(b, h, t // TILE_TOKENS, TILE_TOKENS, w).transpose(0, 1, 2, 4, 3)
    return np.ascontiguousarray(tiles)


def unpack_key_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_key_codes`: ``uint8 [B, H, T, D]``."""
    b, h, nt, w, lanes = words.shape
    tok = words.transpose(0, 1, 2, 4, 3).reshape(b, h, nt * lanes, w)
    return _unpack_last(tok, bits)


def value_code_location(t, c, head_dim: int, bits: int):
    """Where code (token ``t``, channel ``c``) of a 32-token value tile is stored: ``(word, shift)``
    with ``word`` the index into the tile's flat run of ``head_dim * bits`` words and ``shift`` the
    bit of its lowest bit. Works elementwise on integer arrays (and on Python ints).

    Token ``t = 16*kb + 8*pair + 4*half + t4`` (kb, pair, half in {0, 1}, t4 < 4) and channel
    ``c = 16*chunk + 8*hi + g`` (hi in {0, 1}, g < 8) occupy slot

        slot = ((((kb*8 + g)*4 + t4)*2 + pair)*2 + hi) * (head_dim/16) + chunk

    and a slot is one channel of the two tokens ``half = 0, 1``: word ``slot // (16/bits)``, at
    bit ``bits * (slot % (16/bits))`` of the low (half 0) or high (half 1) 16 bits. The kernels
    implement the same formula (``kernels_numba.common.value_code_location``).
    """
    t = np.asarray(t)
    c = np.asarray(c)
    kb, r = t >> 4, t & 15
    t4, half, pair = r & 3, (r >> 2) & 1, r >> 3
    chunk, hi, g = c >> 4, (c >> 3) & 1, c & 7
    slot = ((((kb * 8 + g) * 4 + t4) * 2 + pair) * 2 + hi) * (head_dim // 16) + chunk
    per_half = 16 // bits
    return slot // per_half, 16 * half + bits * (slot % per_half)


def _value_tile_maps(head_dim: int, bits: int):
    """Index arrays of one value tile: ``(tok, chan)`` ``[words, cpw]`` -- code ``j`` of word
    ``w`` (bits ``[bits*j, bits*j + bits)``) is (token ``tok[w, j]``, channel ``chan[w, j]``)."""
    t, c = np.meshgrid(np.arange(TILE_TOKENS), np.arange(head_dim), indexing="ij")
    word, shift = value_code_location(t, c, head_dim, bits)
    cpw = codes_per_word(bits)
    tok = np.empty((head_dim * bits, cpw), np.intp)
    chan = np.empty_like(tok)
    tok[word, shift // bits] = t
    chan[word, shift // bits] = c
    return tok, chan


def pack_value_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``uint8 [B, H, T, D]`` value codes to ``uint32 [B, H, T, D*bits/32]`` (T % 32 == 0): per
    32-token tile, the words of :func:`value_code_location` as one flat run of 32 rows."""
    b, h, t, d = codes.shape
    if t % TILE_TOKENS or d % 16:
        raise ValueError(f"value codes: expected T % {TILE_TOKENS} == 0 and D % 16 == 0, "
                         f"got shape {codes.shape}")
    tok, chan = _value_tile_maps(d, bits)
    tiles = codes.reshape(b, h, t // TILE_TOKENS, TILE_TOKENS, d)[:, :, :, tok, chan]
    words = _pack_last(tiles.reshape(*tiles.shape[:3], -1), bits)  # [B, H, T/32, D * bits]
    return np.ascontiguousarray(words.reshape(b, h, t, d * bits // 32))


def unpack_value_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_value_codes`: ``uint8 [B, H, T, D]``."""
    b, h, t, vw = words.shape
    d = vw * 32 // bits
    if t % TILE_TOKENS or d % 16:
        raise ValueError(f"value words: expected T % {TILE_TOKENS} == 0 and D % 16 == 0, "
                         f"got shape {words.shape} at {bits} bits (D = {d})")
    tok, chan = _value_tile_maps(d, bits)
    flat = _unpack_last(words.reshape(b, h, t // TILE_TOKENS, TILE_TOKENS * vw), bits)
    out = np.empty((b, h, t // TILE_TOKENS, TILE_TOKENS, d), np.uint8)
    out[:, :, :, tok.ravel(), chan.ravel()] = flat
    return out.reshape(b, h, t, d)


def value_param_location(t, j, part, groups: int):
    """Where param ``part`` (0 = scale, 1 = min) of value group ``j`` of token ``t`` of a 32-token
    tile is stored: the index into the tile's flat run of ``64 * groups`` elements (``groups`` =
    ``head_dim / value_group_size``). Works elementwise on integer arrays (and on Python ints).

    Token ``t = 16*kb + 8*pair + 4*half + t4`` (kb, pair, half in {0, 1}, t4 < 4):

        index = (((((kb*2 + part)*4 + t4)*groups + j)*2 + pair)*2 + half

    so the two tokens ``half = 0, 1`` (4 apart) of one (group, part) are adjacent, and the
    ``4 * groups`` elements of one (kb, part, t4) are contiguous. The kernels implement the same
    formula (``kernels_numba.common.value_param_location``).
    """
    t = np.asarray(t)
    kb, r = t >> 4, t & 15
    t4, half, pair = r & 3, (r >> 2) & 1, r >> 3
    return (((((kb * 2 + np.asarray(part)) * 4 + t4) * groups + np.asarray(j)) * 2 + pair) * 2
            + half)


def _value_param_map(groups: int):
    """``index[t, j, part]`` of :func:`value_param_location` for one tile (a permutation)."""
    t, j, part = np.meshgrid(np.arange(TILE_TOKENS), np.arange(groups), np.arange(2),
                             indexing="ij")
    return value_param_location(t, j, part, groups)


def _check_param_tiles(params: np.ndarray, what: str):
    if params.ndim != 5 or params.shape[2] % TILE_TOKENS or params.shape[4] != 2:
        raise ValueError(f"{what}: expected shape [B, H, T, D/gv, 2] with T % {TILE_TOKENS} == 0, "
                         f"got {params.shape}")


def pack_value_params(params: np.ndarray) -> np.ndarray:
    """Token-major value params ``[B, H, T, D/gv, 2]`` ((scale, min) of token t, group j) to the
    tiled order of :func:`value_param_location` (same shape and dtype; T % 32 == 0)."""
    _check_param_tiles(params, "value params")
    b, h, t, ng, _ = params.shape
    tiles = params.reshape(b, h, t // TILE_TOKENS, TILE_TOKENS * ng * 2)
    out = np.empty_like(tiles)
    out[..., _value_param_map(ng).ravel()] = tiles
    return out.reshape(params.shape)


def unpack_value_params(params: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_value_params`: token-major ``[B, H, T, D/gv, 2]``."""
    _check_param_tiles(params, "value params")
    b, h, t, ng, _ = params.shape
    tiles = params.reshape(b, h, t // TILE_TOKENS, TILE_TOKENS * ng * 2)
    return np.ascontiguousarray(tiles[..., _value_param_map(ng).ravel()].reshape(params.shape))
