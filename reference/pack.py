"""Bit packing of codes into uint32 words, in the layout of docs/format.md.

Inside a word, code j (j = 0 .. 32/bits - 1) sits at bits ``[bits*j, bits*j + bits)``, and the
codes of one word are ``32/bits`` consecutive channels of one token. So a thread extracts channel
``c`` of a token with ``(word[c // cpw] >> (bits * (c % cpw))) & (2**bits - 1)``.

Keys are tiled by 32 tokens (one warp) so that a warp's load of word w reads 32 consecutive
uint32 (128 bytes, one coalesced transaction) holding word w of 32 tokens:

    k_codes[b, h, i, w, l]  = word w (channels w*cpw .. w*cpw+cpw-1) of token 32*i + l
    v_codes[b, h, t, w]     = word w of token t

Values are token-major: 32/(D*bits/32) consecutive tokens fill 128 bytes, read by one warp.
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


def pack_value_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``uint8 [B, H, T, D]`` value codes to ``uint32 [B, H, T, D*bits/32]``."""
    return np.ascontiguousarray(_pack_last(codes, bits))


def unpack_value_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_value_codes`: ``uint8 [B, H, T, D]``."""
    return _unpack_last(words, bits)
