"""One quantized block: rotation, token scaling, quantization and packing of whole key groups.

``quantize_block`` is the reference of the fused quantize kernel: it turns ``seq_len`` tokens
(a multiple of ``key_group_size``; the cache always passes whole residual windows) into the packed
arrays of docs/format.md. Blocks are independent (token norms are per token, key groups never
cross a block), so quantizing T tokens at once equals quantizing them block by block.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from .hadamard import hadamard_transform
from .norms import safe_norms, token_norms
from .pack import (pack_key_codes, pack_value_codes, pack_value_params, unpack_key_codes,
                   unpack_value_codes, unpack_value_params)
from .quantize import (check_storable, dequantize_keys, dequantize_values, quantize_keys,
                       quantize_values)


@dataclasses.dataclass
class PackedBlock:
    """The packed arrays of ``seq_len`` quantized tokens (shapes in docs/format.md).

    Attributes:
        k_codes: uint32 ``[batch, num_kv_heads, seq_len / 32, head_dim * key_bits / 32, 32]``.
        k_params: param dtype ``[batch, num_kv_heads, seq_len / key_group_size, head_dim, 2]``.
        v_codes: uint32 ``[batch, num_kv_heads, seq_len, head_dim * value_bits / 32]``.
        v_params: param dtype ``[batch, num_kv_heads, seq_len, head_dim / value_group_size, 2]``,
            (scale, min) per token and value group in the tiled order of
            ``pack.value_param_location`` (docs/format.md).
        norms: float32 ``[batch, 1 or num_kv_heads, seq_len]``, or None without token scaling.
    """

    k_codes: np.ndarray
    k_params: np.ndarray
    v_codes: np.ndarray
    v_params: np.ndarray
    norms: Optional[np.ndarray]

    @property
    def seq_len(self) -> int:
        return self.v_codes.shape[2]

    def arrays(self) -> dict:
        out = dict(k_codes=self.k_codes, k_params=self.k_params, v_codes=self.v_codes,
                   v_params=self.v_params)
        if self.norms is not None:
            out["norms"] = self.norms
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


def rotate_and_scale_keys(k: np.ndarray, config):
    """Keys ``[B, H, T, D]`` to the quantizer's input ``u`` and the stored norms (or None)."""
    u = np.asarray(k, dtype=np.float32)
    if config.rotate_keys:
        u = hadamard_transform(u)
    norms = None
    if config.scale_tokens:
        norms = safe_norms(token_norms(u, config.norm_scope))  # [B, S, T], S = 1 or H
        u = u / norms[:, :, :, None]  # float32 true division, broadcast over heads if S == 1
    return u, norms


def quantize_block(k: np.ndarray, v: np.ndarray, config) -> PackedBlock:
    """Quantize and pack ``k, v [batch, num_kv_heads, seq_len, head_dim]`` (float32 values).

    ``seq_len`` must be a multiple of ``config.key_group_size``.
    """
    u, norms = rotate_and_scale_keys(k, config)
    kc, kp = quantize_keys(u, config.key_bits, config.key_group_size, config.param_dtype, "k")
    vr = np.asarray(v, dtype=np.float32)
    if config.rotate_values:
        vr = hadamard_transform(vr)
    vc, vp = quantize_values(vr, config.value_bits, config.value_group_size, config.param_dtype,
                             "v")
    return PackedBlock(
        k_codes=pack_key_codes(kc, config.key_bits),
        k_params=kp,
        v_codes=pack_value_codes(vc, config.value_bits),
        v_params=pack_value_params(vp),
        norms=norms,
    )


def check_residual_tokens(k_before, k_new, v_new, config, names=("k", "v")) -> None:
    """Raise ValueError now for tokens entering the residual window that a later flush would
    reject (float16 params only; the cache calls this before it changes any state).

    ``k_new, v_new [B, H, n, D]`` (float32, already rounded to the residual dtype) go to window
    positions ``p .. p + n - 1``, after ``k_before [B, H, p, D]`` (the residual keys already
    there). Every check is the flush's own (:func:`check_storable` on the same float32 values),
    applied as early as the values allow: per token for overflow (a group's extremes are its
    tokens' values) and for value groups (one token each); per key group once this append
    completes it (a key group spans ``key_group_size`` tokens, so its underflow is only known
    then). A key group left incomplete is checked by the append that completes it.
    """
    if config.param_dtype != "float16" or k_new.shape[2] == 0:
        return
    name_k, name_v = names
    vr = hadamard_transform(v_new) if config.rotate_values else np.asarray(v_new, np.float32)
    g = vr.reshape(vr.shape[:3] + (-1, config.value_group_size))
    mn, mx = g.min(axis=-1) + np.float32(0.0), g.max(axis=-1) + np.float32(0.0)
    levels = np.float32((1 << config.value_bits) - 1)
    check_storable(mn, mx, (mx - mn) / levels, "float16", name_v)
    u, _ = rotate_and_scale_keys(k_new, config)
    levels = np.float32((1 << config.key_bits) - 1)
    # overflow per element: a key group's extremes are values of its tokens (passed as a
    # constant pseudo-group, which the underflow rule leaves alone)
    top = np.abs(u).max(initial=np.float32(0.0))[None]
    check_storable(top, top, np.zeros(1, np.float32), "float16", name_k)
    gk, p, n = config.key_group_size, k_before.shape[2], k_new.shape[2]
    first, end = p // gk * gk, (p + n) // gk * gk  # key groups completed by this append
    if end > first:
        u_all, _ = rotate_and_scale_keys(
            np.concatenate((k_before[:, :, first:p], k_new[:, :, : end - p]), axis=2), config)
        b, h, t, d = u_all.shape
        grp = u_all.reshape(b, h, t // gk, gk, d)
        mn, mx = grp.min(axis=3) + np.float32(0.0), grp.max(axis=3) + np.float32(0.0)
        check_storable(mn, mx, (mx - mn) / levels, "float16", name_k)


def dequantize_block_rotated(block: PackedBlock, config):
    """Dequantized keys and values in the stored (rotated, scaled) domain, float32.

    Returns ``(u_hat, v_rot_hat)``: keys before multiplying by the norm, values before
    un-rotation. Attention uses these directly (the query is rotated instead).
    """
    u_hat = dequantize_keys(unpack_key_codes(block.k_codes, config.key_bits), block.k_params)
    v_hat = dequantize_values(unpack_value_codes(block.v_codes, config.value_bits),
                              unpack_value_params(block.v_params))
    return u_hat, v_hat


def dequantize_block(block: PackedBlock, config):
    """The block's keys and values back in the input domain, float32 ``[B, H, T, D]``.

    ``k_hat = H (n * u_hat)`` and ``v_hat = H v_rot_hat`` (H is its own inverse), each transform
    skipped where the configuration skips it.
    """
    u_hat, v_hat = dequantize_block_rotated(block, config)
    if block.norms is not None:
        u_hat = u_hat * block.norms[:, :, :, None]
    if config.rotate_keys:
        u_hat = hadamard_transform(u_hat)
    if config.rotate_values:
        v_hat = hadamard_transform(v_hat)
    return u_hat.astype(np.float32), v_hat.astype(np.float32)


def concat_blocks(blocks) -> PackedBlock:
    """Concatenate blocks along the token axis (each array's token axis per docs/format.md)."""
    blocks = list(blocks)
    cat = lambda name, axis: np.concatenate([getattr(b, name) for b in blocks], axis=axis)
    return PackedBlock(
        k_codes=cat("k_codes", 2),
        k_params=cat("k_params", 2),
        v_codes=cat("v_codes", 2),
        v_params=cat("v_params", 2),
        norms=None if blocks[0].norms is None else cat("norms", 2),
    )


def empty_block(batch, num_kv_heads, head_dim, config) -> PackedBlock:
    """A block of zero tokens with the right trailing shapes and dtypes."""
    pd = np.float16 if config.param_dtype == "float16" else np.float32
    kw = head_dim * config.key_bits // 32
    vw = head_dim * config.value_bits // 32
    s = 1 if config.norm_scope == "token" else num_kv_heads
    return PackedBlock(
        k_codes=np.zeros((batch, num_kv_heads, 0, kw, 32), np.uint32),
        k_params=np.zeros((batch, num_kv_heads, 0, head_dim, 2), pd),
        v_codes=np.zeros((batch, num_kv_heads, 0, vw), np.uint32),
        v_params=np.zeros((batch, num_kv_heads, 0, head_dim // config.value_group_size, 2), pd),
        norms=np.zeros((batch, s, 0), np.float32) if config.scale_tokens else None,
    )
