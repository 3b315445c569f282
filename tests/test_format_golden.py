"""Golden test of the packed layout: the worked example of docs/format.md, bit for bit.

The input is built from integer arithmetic only (every value is a multiple of 1/32, exact in
float32), so it is the same on every machine and NumPy version; the expected arrays below are the
ones printed in docs/format.md ("Worked example"), and a test checks that the document still
prints them. If the layout or the quantizer rounding changes on purpose, regenerate both.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import oscar
from oscar.reference.block import quantize_block
from oscar.reference.pack import unpack_value_codes, value_param_location

#: The worked example's configuration: the defaults (INT2, rotation + token scaling, key and
#: value groups of 32, float16 params) with a residual window of one key group, so that 32
#: tokens are exactly one quantized block.
CONFIG = oscar.OScaRConfig(residual_length=32)
SEQ_LEN = HEAD_DIM = 32
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "format.md"


def golden_input():
    """``k, v`` float32 ``[1, 1, 32, 32]`` of the worked example (docs/format.md).

    ``k[t, c] = (((7t + 5c + (t*c mod 11)) mod 9) - 4) / 4``, plus 4 on channel 3 (a channel
    outlier), and token 0 divided by 8 (a low-norm sink token);
    ``v[t, c] = (((3t + 11c + (t*c mod 5)) mod 7) - 3) / 2``.
    """
    t = np.arange(SEQ_LEN)[:, None]
    c = np.arange(HEAD_DIM)[None, :]
    k = (((t * 7 + c * 5 + (t * c) % 11) % 9) - 4) / 4.0
    k[:, 3] += 4.0
    k[0] /= 8.0
    v = (((t * 3 + c * 11 + (t * c) % 5) % 7) - 3) / 2.0
    return k[None, None].astype(np.float32), v[None, None].astype(np.float32)


#: k_codes[0, 0, 0, w, lane]: word 0 of lanes 0..31, then word 1 of lanes 0..31
K_CODES = (
    0x9ad2b565, 0x65e69166, 0x95a69a8a, 0xe8654962, 0x45568476, 0x9695aaac, 0x596b976a, 0xa92b6256,
    0x8e966a6a, 0x8927085a, 0x5b26919a, 0x455ea89a, 0x4a59e6a9, 0x56556635, 0x47d4a6ba, 0x6a55a6aa,
    0x5655956b, 0x8595945a, 0x07c5a16d, 0x5e959656, 0x5a95da8d, 0x969a9da5, 0x9661946a, 0xa5d69d66,
    0x596ab4d2, 0x766a959a, 0x51076a55, 0x96959554, 0x6ad49756, 0xd47aa255, 0x92158575, 0xa1e5309a,
    0x1652985a, 0xea99b19b, 0x569669f1, 0x85ea2595, 0x9497a9a9, 0xaaaba9a9, 0x69a63f95, 0x6e83588b,
    0x492a15b6, 0x5696955a, 0x516e998f, 0xaaa75556, 0x5a968d24, 0x66eb6546, 0x3b97696b, 0x5ba784a5,
    0x56965958, 0x5b67905b, 0x55da616a, 0x76d6d949, 0x5aa659a5, 0x5d979591, 0x56a6956a, 0xe69b71ab,
    0x69a61db6, 0xd1b2485a, 0x79c4a959, 0x56969554, 0x94a6b99a, 0x66a36556, 0x1a7264fb, 0x5696a55a,
)
#: v_codes[0, 0, t, w] as one flat run (the 32-token tile, docs/format.md "Value tiles")
V_CODES = (
    0x1e55aaaa, 0xdaaa55a2, 0x4591559d, 0x552d5596, 0xab459a5a, 0x4a7a5596, 0x55057528, 0xb50149a6,
    0x55541aae, 0x48a64453, 0x56165569, 0x15512e36, 0x6a44b95a, 0x69da456b, 0x45ad1556, 0x61109ca7,
    0x5555eea7, 0xb6af456a, 0x4551556a, 0x410568a6, 0x6a44eaca, 0x9a4a45ed, 0x57561556, 0x34054569,
    0x9a55cea5, 0x96a754d4, 0x54525959, 0x9440540d, 0x55476afa, 0x1ada5726, 0x45524596, 0x49549665,
    0x7655ba59, 0xe66a6616, 0xaab25a9a, 0xaa69e255, 0xb955ea65, 0x9a7586a5, 0x4aaf6559, 0xea65dd66,
    0xe555aa6d, 0x6eed55a6, 0xa6ab949e, 0x9197ea56, 0x9955ae95, 0xbbd165aa, 0xdaaa515a, 0x6b45aa75,
    0x1915e956, 0x995569a5, 0xa5fa9b25, 0xa995ae65, 0x6671ba4a, 0xe459b6fa, 0xdaba659a, 0xaa51ae57,
    0x29419e26, 0xab9556aa, 0xadaaaee6, 0xaab5aa65, 0xea14a859, 0x6c6565a9, 0x7aae9596, 0xaad5ba54,
)
#: float16 bits of k_params[0, 0, 0, c, :]: (scale, min) of channel 0, channel 1, ...
K_PARAMS = (
    0x36c4, 0xb868, 0x2c1d, 0xb39d, 0x2f23, 0xb599, 0x345e, 0xb3a0,
    0x30cc, 0xac06, 0x3003, 0xb4bd, 0x2f9b, 0xb4a3, 0x34fc, 0xb608,
    0x306b, 0xad62, 0x355e, 0xb8ba, 0x32af, 0xb64f, 0x3040, 0xad0f,
    0x3056, 0xadaa, 0x30d0, 0xb52f, 0x3100, 0xb4c7, 0x31b4, 0xb035,
    0x3017, 0xadff, 0x3284, 0xb719, 0x3184, 0xb5a7, 0x318c, 0xaf16,
    0x3252, 0xaa8c, 0x311e, 0xb5e7, 0x3158, 0xb5e3, 0x3198, 0xb091,
    0x30ed, 0xb1de, 0x308f, 0xb429, 0x3208, 0xb653, 0x332b, 0xb51a,
    0x347c, 0xb5a7, 0x3079, 0xb571, 0x3246, 0xb67b, 0x306f, 0xa45d,
)
#: float16 bits of v_params as one flat run (the 32-token tile, docs/format.md "Value param
#: tiles"): the scales of tokens 0, 4 | 8, 12 | 1, 5 | ... of block 0, its mins, then block 1
V_PARAMS = (
    0x3e9a, 0x3e9a, 0x3de4, 0x3e21, 0x3cf3, 0x3e9a, 0x3e9a, 0x3cf3,
    0x3e21, 0x3d6c, 0x3e9a, 0x3e9a, 0x3cf3, 0x3f12, 0x3d6c, 0x3cf3,
    0xc36d, 0xbcf3, 0xc14e, 0xc0f3, 0xc011, 0xc36d, 0xbcf3, 0xbeb8,
    0xbf6d, 0xbda8, 0xbf6d, 0xbf6d, 0xc011, 0xbd4e, 0xbda8, 0xbcf3,
    0x3e21, 0x3e9a, 0x3e9a, 0x3d6c, 0x3e9a, 0x3e9a, 0x3e9a, 0x3de4,
    0x3e9a, 0x3f8b, 0x3e21, 0x3e9a, 0x3e9a, 0x3e21, 0x3f12, 0x3e9a,
    0xbeb8, 0xbcf3, 0xc36d, 0xc099, 0xc230, 0xc1d5, 0xc0f3, 0xc0f3,
    0xc099, 0xc411, 0xc099, 0xc230, 0xc0f3, 0xbeb8, 0xc2e5, 0xc28a,
)
#: float32 bits of norms[0, 0, t]
NORMS = (
    0x3f38de16, 0x40bfaa98, 0x40c1fd5c, 0x408fc711, 0x40cab3a6, 0x409c9026, 0x409f661c, 0x40a0ff34,
    0x40a42572, 0x40a51e3e, 0x40a8f31f, 0x409fccc5, 0x40a61596, 0x40ac23b5, 0x40b6c74f, 0x40a54fd4,
    0x40b172d6, 0x40b3f49f, 0x40c1a8d5, 0x40b1cf13, 0x40b90a61, 0x40c27be3, 0x40bd253c, 0x40c595de,
    0x409497e9, 0x4095aa92, 0x409a4c65, 0x4086d182, 0x40a830bc, 0x40a48924, 0x40a5e43b, 0x40abf417,
)

#: The steps the document walks through, by hand.
TOKEN0_KEY_CODES_CH0_15 = (1, 1, 2, 1, 1, 1, 3, 2, 2, 0, 1, 3, 2, 2, 1, 2)
TOKEN0_VALUE_CODES = (2, 2, 2, 2, 3, 2, 1, 2, 2, 1, 2, 1, 2, 0, 2, 3,
                      2, 2, 3, 2, 1, 2, 1, 2, 2, 1, 2, 1, 2, 3, 2, 3)
CHANNEL0_KEY_CODES = (1, 2, 2, 2, 2, 0, 2, 2, 2, 2, 2, 2, 1, 1, 2, 2,
                      3, 2, 1, 2, 1, 1, 2, 2, 2, 2, 1, 0, 2, 1, 1, 2)


def _bits(a, dtype):
    return np.ascontiguousarray(a).view(dtype).ravel().tolist()


def _check_golden(p):
    assert p.k_codes.shape == (1, 1, 1, 2, 32) and p.k_codes.dtype == np.uint32
    assert p.v_codes.shape == (1, 1, 32, 2) and p.v_codes.dtype == np.uint32
    assert p.k_params.shape == (1, 1, 1, 32, 2) and p.k_params.dtype == np.float16
    assert p.v_params.shape == (1, 1, 32, 1, 2) and p.v_params.dtype == np.float16
    assert p.norms.shape == (1, 1, 32) and p.norms.dtype == np.float32
    assert p.k_codes.ravel().tolist() == list(K_CODES)
    assert p.v_codes.ravel().tolist() == list(V_CODES)
    assert _bits(p.k_params, np.uint16) == list(K_PARAMS)
    assert _bits(p.v_params, np.uint16) == list(V_PARAMS)
    assert _bits(p.norms, np.uint32) == list(NORMS)


def test_input_is_exact():
    k, v = golden_input()
    assert np.array_equal(k * 32, np.rint(k * 32)) and np.array_equal(v * 2, np.rint(v * 2))
    assert k[0, 0, 0, :4].tolist() == [-0.125, 0.03125, -0.09375, 0.5625]


def test_public_api_packs_the_golden_arrays():
    k, v = golden_input()
    cache = oscar.quantize_kv(k, v, CONFIG)
    assert (cache.quantized_len, cache.residual_len) == (32, 0)
    _check_golden(cache.packed())


def test_reference_block_packs_the_golden_arrays():
    k, v = golden_input()
    _check_golden(quantize_block(k, v, CONFIG))


def test_token_by_token_append_packs_the_golden_arrays():
    k, v = golden_input()
    cache = oscar.QuantizedKVCache.empty(1, 1, HEAD_DIM, "float32", CONFIG)
    for t in range(SEQ_LEN):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
    _check_golden(cache.packed())


def test_worked_steps_of_the_document():
    """The numbers quoted in the prose of docs/format.md, recomputed from the golden arrays."""
    # channel 0 of the key group: (scale, min) as float16 bits and values
    assert K_PARAMS[0:2] == (0x36C4, 0xB868)
    scale, mn = np.array(K_PARAMS[0:2], np.uint16).view(np.float16).astype(np.float32)
    assert (float(scale), float(mn)) == (0.4228515625, -0.55078125)
    # codes: unpack lane l of word w with shift and mask
    codes = [[(K_CODES[32 * w + lane] >> (2 * j)) & 3 for w in range(2) for j in range(16)]
             for lane in range(32)]
    assert tuple(codes[0][:16]) == TOKEN0_KEY_CODES_CH0_15
    assert tuple(row[0] for row in codes) == CHANNEL0_KEY_CODES
    # word 0 of token 0 from its codes: code j at bits [2j, 2j + 2)
    assert sum(c << (2 * j) for j, c in enumerate(TOKEN0_KEY_CODES_CH0_15)) == 0x9AD2B565
    # the sink's norm and the value params of token 0
    assert float(np.array([NORMS[0]], np.uint32).view(np.float32)[0]) == 0.7221387624740601
    # the value params of token 0: its scale is element 0 (word 0 low half, with token 4's scale
    # in the high half), its min element 16 (after the 16 scales of block 0)
    assert (V_PARAMS[0], V_PARAMS[16]) == (0x3E9A, 0xC36D)
    assert value_param_location(0, 0, 0, 1) == 0 and value_param_location(0, 0, 1, 1) == 16
    assert [value_param_location(t, 0, 0, 1) for t in (4, 8, 12, 1)] == [1, 2, 3, 4]
    # value codes of token 0, and word 0 of the value tile from the codes of its 8 slots
    vc = unpack_value_codes(np.array(V_CODES, np.uint32).reshape(1, 1, 32, 2), 2)[0, 0]
    assert tuple(vc[0]) == TOKEN0_VALUE_CODES
    slots = [(0, 0), (0, 16), (0, 8), (0, 24), (8, 0), (8, 16), (8, 8), (8, 24)]
    assert [int(vc[t, c]) for t, c in slots] == [2] * 8  # tokens 0 and 8: the low 16 bits
    assert [int(vc[t + 4, c]) for t, c in slots] == [1, 1, 1, 1, 2, 3, 1, 0]  # tokens 4 and 12
    word = sum((int(vc[t, c]) << (2 * j)) | (int(vc[t + 4, c]) << (16 + 2 * j))
               for j, (t, c) in enumerate(slots))
    assert word == V_CODES[0] == 0x1E55AAAA


def _doc_blocks(text):
    """Named hex blocks between the golden markers of docs/format.md: {name: [int, ...]}."""
    section = re.search(r"<!-- golden:begin -->(.*?)<!-- golden:end -->", text, re.S)
    assert section, "docs/format.md: golden markers not found"
    blocks, name = {}, None
    for line in section.group(1).splitlines():
        head = re.match(r"^(\w+)\b.*:\s*$", line)
        if head:
            name = head.group(1)
            blocks[name] = []
        elif name and re.fullmatch(r"[0-9a-f ]+", line.strip() or "x"):
            blocks[name] += [int(tok, 16) for tok in line.split()]
    return blocks


def test_document_prints_the_golden_arrays():
    if not DOC.exists():
        pytest.skip(f"{DOC} not present (installed package without docs)")
    blocks = _doc_blocks(DOC.read_text())
    assert blocks == {"k_codes": list(K_CODES), "v_codes": list(V_CODES),
                      "k_params": list(K_PARAMS), "v_params": list(V_PARAMS),
                      "norms": list(NORMS)}
