"""Key preprocessing of the reference: Canalized Rotation (Hadamard) and Omni-Token Scaling norms.

Exact tests check the reference against scipy.linalg.hadamard and a pure-Python halving tree;
float32 tests use a derived bound instead of a hand-picked tolerance.
"""

import math

import numpy as np
import pytest
import scipy.linalg

import oscar
from oscar.reference import hadamard_matrix, hadamard_transform, safe_norms, token_norms
from oscar.reference.block import rotate_and_scale_keys
from oscar.reference.hadamard import hadamard_scale
from oscar.reference.norms import tree_sum_last

from helpers_reference import U32, U64

HEAD_DIMS = [32, 64, 128, 256]
#: Also the sizes below the supported head_dim range: the transform itself takes any power of two.
ALL_POW2 = [1, 2, 4, 8, 16] + HEAD_DIMS


def _scipy_h(d):
    return scipy.linalg.hadamard(d).astype(np.float64)


# --- Hadamard: exact ------------------------------------------------------------------------


@pytest.mark.parametrize("d", ALL_POW2)
def test_matrix_equals_scipy(d):
    # +-1 times the same float64 1/sqrt(D): bit-exact.
    assert np.array_equal(hadamard_matrix(d), _scipy_h(d) / np.sqrt(d))


@pytest.mark.parametrize("d", ALL_POW2)
def test_transform_float64_exact_on_integers(d):
    # Small integers: every butterfly sum is exact in float64 and so is x @ H_int, so both sides
    # are the same integer vector times the same rounded 1/sqrt(D): equal bit for bit.
    rng = np.random.default_rng(d)
    x = rng.integers(-1000, 1000, size=(3, 5, d)).astype(np.float64)
    expected = (x @ _scipy_h(d)) * (1.0 / np.sqrt(np.float64(d)))
    got = hadamard_transform(x)
    assert got.dtype == np.float64
    assert np.array_equal(got, expected)
    unnormalized = hadamard_transform(x, normalize=False)
    assert np.array_equal(unnormalized, x @ _scipy_h(d))


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_transform_float64_random(d):
    # log2(D) stages of float64 adds plus one multiply: |err| <= (log2 D + 2) u64 ||x||.
    rng = np.random.default_rng(d + 1)
    x = rng.standard_normal((7, d))
    expected = x @ (_scipy_h(d) / np.sqrt(d))
    bound = (math.log2(d) + 2) * U64 * np.linalg.norm(x, axis=-1, keepdims=True)
    assert np.all(np.abs(hadamard_transform(x) - expected) <= bound)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_transform_float32_within_derived_bound(d):
    # Each unnormalized butterfly stage is sqrt(2) times an orthogonal map and adds a rounding
    # error of at most u32 times the current vector norm; summing over log2(D) stages and the final
    # multiply by float32(1/sqrt(D)) (itself off by <= u32) gives, elementwise,
    #     |H32(x) - H(x)| <= ||error||_2 <= (log2(D) + 2) * u32 * ||x||_2   (to first order).
    rng = np.random.default_rng(d + 2)
    x = (rng.standard_normal((64, d)) * np.exp(rng.uniform(-3, 3, (64, 1)))).astype(np.float32)
    got = hadamard_transform(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    exact = x.astype(np.float64) @ (_scipy_h(d) / np.sqrt(d))
    bound = (math.log2(d) + 2) * U32 * np.linalg.norm(x.astype(np.float64), axis=-1,
                                                      keepdims=True)
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= bound), float((err / bound).max())


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_self_inverse(d):
    rng = np.random.default_rng(d + 3)
    # float64 on integers: exact where 1/sqrt(D) is a power of two (D = 64, 256): every
    # intermediate is a dyadic rational with few bits. Otherwise the first pass rounds and the
    # second pass sums those roundings: twice the one-way bound.
    x = rng.integers(-50, 50, size=(4, d)).astype(np.float64)
    back = hadamard_transform(hadamard_transform(x))
    if d in (64, 256):
        assert np.array_equal(back, x)
    else:
        bound64 = 2 * (math.log2(d) + 2) * U64 * np.linalg.norm(x, axis=-1, keepdims=True)
        assert np.all(np.abs(back - x) <= bound64)
    # float32: twice the one-way bound (the transform is orthogonal, errors do not grow).
    x32 = rng.standard_normal((16, d)).astype(np.float32)
    back32 = hadamard_transform(hadamard_transform(x32)).astype(np.float64)
    bound = 2 * (math.log2(d) + 2) * U32 * np.linalg.norm(x32.astype(np.float64), axis=-1,
                                                          keepdims=True)
    assert np.all(np.abs(back32 - x32) <= bound)


def test_transform_leaves_input_and_shapes():
    x = np.arange(2 * 3 * 4 * 32, dtype=np.float32).reshape(2, 3, 4, 32)
    before = x.copy()
    y = hadamard_transform(x)
    assert np.array_equal(x, before)  # "returns a new array; x is not modified"
    assert y.shape == x.shape and y.dtype == np.float32
    # float16 input is computed in float32 (documented dtype rule)
    assert hadamard_transform(x.astype(np.float16)).dtype == np.float32


@pytest.mark.parametrize("d", [0, 3, 48, 96])
def test_transform_rejects_non_power_of_two(d):
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(np.ones((2, d), np.float32))


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_hadamard_scale_rounded_once(d):
    assert hadamard_scale(d) == np.float32(1.0 / math.sqrt(d))
    assert hadamard_scale(d).dtype == np.float32


def test_butterfly_order_is_the_documented_one():
    # The docstring's order, written out with python loops and float32 scalars: bit-exact.
    d = 32
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, d)).astype(np.float32)
    expected = np.empty_like(x)
    for r in range(x.shape[0]):
        y = [np.float32(v) for v in x[r]]
        h = 1
        while h < d:
            for i in range(d):
                if i & h == 0:
                    y[i], y[i + h] = np.float32(y[i] + y[i + h]), np.float32(y[i] - y[i + h])
            h *= 2
        s = np.float32(1.0 / math.sqrt(d))
        expected[r] = [np.float32(v * s) for v in y]
    assert np.array_equal(hadamard_transform(x), expected)


# --- token norms ----------------------------------------------------------------------------


def _python_tree(s):
    """The halving tree of reference/norms.py over float32 values, in loops."""
    s = list(s)
    p = 1
    while p < len(s):
        p *= 2
    s += [np.float32(0.0)] * (p - len(s))
    while p > 1:
        p //= 2
        for i in range(p):
            s[i] = np.float32(s[i] + s[i + p])
    return s[0]


def _python_head_sum(values):
    """A head's float32 sum of squares (reference/norms.py docstring), in loops: the tree inside
    each run of 32 channels, then the tree over the runs."""
    q = [np.float32(np.float32(v) * np.float32(v)) for v in values]
    run = min(len(q), 32)
    return _python_tree([_python_tree(q[j:j + run]) for j in range(0, len(q), run)])


@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 32), (3, 32), (2, 64), (5, 128),
                                                   (3, 256)])
def test_token_norms_match_python_tree(num_kv_heads, head_dim):
    rng = np.random.default_rng(num_kv_heads * head_dim)
    b, t = 2, 3
    # wide dynamic range so that a different summation order would change the last bits
    x = (rng.standard_normal((b, num_kv_heads, t, head_dim))
         * np.exp(rng.uniform(-6, 6, (b, num_kv_heads, t, head_dim)))).astype(np.float32)
    tok = token_norms(x, "token")
    head = token_norms(x, "head")
    assert tok.shape == (b, 1, t) and tok.dtype == np.float32
    assert head.shape == (b, num_kv_heads, t) and head.dtype == np.float32
    for bi in range(b):
        for ti in range(t):
            sums = [_python_head_sum(list(x[bi, h, ti])) for h in range(num_kv_heads)]
            assert tok[bi, 0, ti] == np.float32(np.sqrt(_python_tree(sums)))
            for h in range(num_kv_heads):
                assert head[bi, h, ti] == np.float32(np.sqrt(sums[h]))


def test_token_norm_order_matters():
    # Guard that the test above is sensitive to order: the flattened (head, channel) halving
    # tree, an equally valid order, gives different bits for some tokens.
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((1, 5, 64, 128))
         * np.exp(rng.uniform(-6, 6, (1, 5, 64, 128)))).astype(np.float32)
    flat = np.ascontiguousarray((x * x).transpose(0, 2, 1, 3)).reshape(1, 64, 5 * 128)
    assert not np.array_equal(token_norms(x, "token")[:, 0], np.sqrt(tree_sum_last(flat)))


def test_tree_sum_differs_from_sequential_order_somewhere():
    # Guard that the test above is sensitive to order: some input sums differently left to right.
    rng = np.random.default_rng(0)
    sq = (rng.standard_normal((200, 96)) * np.exp(rng.uniform(-8, 8, (200, 96)))).astype(
        np.float32) ** 2
    seq = np.zeros(200, np.float32)
    for i in range(96):
        seq = (seq + sq[:, i]).astype(np.float32)
    assert not np.array_equal(tree_sum_last(sq), seq)


def test_token_norms_close_to_float64():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9, 64)).astype(np.float32)
    exact = np.sqrt((x.astype(np.float64) ** 2).sum(axis=(1, 3)))
    # n - 1 float32 adds of non-negative terms plus the squares and the sqrt: relative error
    # <= (log2(n) + 2) u32 for the tree (each term takes part in log2(n) adds).
    n = 4 * 64
    np.testing.assert_allclose(token_norms(x, "token")[:, 0], exact,
                               rtol=(math.log2(n) + 3) * U32)


def test_token_norms_bad_scope():
    with pytest.raises(ValueError, match="scope"):
        token_norms(np.ones((1, 1, 1, 32), np.float32), "channel")


def test_safe_norms():
    raw = np.array([0.0, np.inf, -np.inf, np.nan, 2.5, 1e-30, 3e38], np.float32)
    out = safe_norms(raw)
    assert out.dtype == np.float32
    assert np.array_equal(out, np.array([1, 1, 1, 1, 2.5, 1e-30, 3e38], np.float32))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_overflowing_norm_becomes_one():
    # squares of 2e19 overflow float32 to inf: the stored norm is 1 and the token is not scaled
    x = np.zeros((1, 2, 32, 32), np.float32)
    x[0, 0, 0, 0] = 2e19
    x[0, 0, 1, :] = 0.0  # zero token
    x[0, :, 2:, :] = 1.0
    cfg = oscar.OScaRConfig(rotate_keys=False, param_dtype="float32")
    u, norms = rotate_and_scale_keys(x, cfg)
    assert np.isinf(token_norms(x)[0, 0, 0])
    assert norms[0, 0, 0] == 1.0 and norms[0, 0, 1] == 1.0
    assert np.array_equal(u[0, :, :2], x[0, :, :2])
    np.testing.assert_allclose(norms[0, 0, 2:], 8.0)  # sqrt(2 heads * 32 channels)


@pytest.mark.parametrize("scope", ["token", "head"])
def test_scaled_keys_have_unit_norm(scope):
    rng = np.random.default_rng(2)
    k = (rng.standard_normal((2, 3, 32, 64)) * np.exp(rng.uniform(-4, 4, (2, 1, 32, 1)))).astype(
        np.float32)
    cfg = oscar.OScaRConfig(norm_scope=scope)
    u, norms = rotate_and_scale_keys(k, cfg)
    assert norms.shape == ((2, 1, 32) if scope == "token" else (2, 3, 32))
    axes = (1, 3) if scope == "token" else (3,)
    unit = np.sqrt((u.astype(np.float64) ** 2).sum(axis=axes))
    np.testing.assert_allclose(unit, 1.0, rtol=1e-5)
    # the cache stores exactly these norms
    cache = oscar.quantize_kv(k, k, cfg.replace(residual_length=32))
    assert np.array_equal(cache.packed().norms, norms)
