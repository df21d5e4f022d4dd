"""`reference.compose_adapters`: exact concatenation, rank-space truncation vs dense SVD, bad input."""

from __future__ import annotations

import pytest
import torch

from v2l_fast import ops
from v2l_fast.reference import compose_adapters


def dense_delta(A, B):
    return B.mT.double() @ A.double()


def random_segments(k, ranks, I, O, lead=(), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    As = [torch.randn(*lead, r, I, generator=gen, dtype=dtype) for r in ranks[:k]]
    Bs = [torch.randn(*lead, r, O, generator=gen, dtype=dtype) for r in ranks[:k]]
    return As, Bs


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weights", [None, [0.5, -2.0, 1.25]])
def test_concatenation_reproduces_the_weighted_sum(with_bias, weights):
    As, Bs = random_segments(3, [4, 1, 7], 37, 23, lead=(2,))
    bias = None
    if with_bias:
        bias = (torch.randn(2, 3, 37, dtype=torch.float64), torch.randn(2, 3, 23, dtype=torch.float64))
    A, B = compose_adapters(As, Bs, weights=weights, bias=bias)
    assert A.shape == (2, 12 + (3 if with_bias else 0), 37) and B.shape[-1] == 23
    w = weights or [1.0] * 3
    expected = sum(wi * dense_delta(a, b) for wi, a, b in zip(w, As, Bs))
    if bias is not None:
        expected = expected + dense_delta(*bias)
    torch.testing.assert_close(dense_delta(A, B), expected, rtol=1e-12, atol=1e-10)
    # Layout: chunk-major, A rows scaled by their weight, B rows untouched, bias last.
    torch.testing.assert_close(A[:, 4:5], w[1] * As[1])
    torch.testing.assert_close(B[:, 5:12], Bs[2])
    if bias is not None:
        torch.testing.assert_close(A[:, -3:], bias[0])


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_max_rank_equals_truncated_svd_of_the_dense_sum(k, dtype):
    As, Bs = random_segments(3, [5, 2, 4], 50, 31, lead=(3,), dtype=dtype, seed=k)
    A_k, B_k = compose_adapters(As, Bs, weights=[1.0, 0.3, -0.7], max_rank=k)
    assert A_k.shape == (3, k, 50) and B_k.shape == (3, k, 31) and A_k.dtype == dtype
    dense = sum(w * dense_delta(a, b) for w, a, b in zip([1.0, 0.3, -0.7], As, Bs))
    U, S, Vh = torch.linalg.svd(dense)
    best = U[..., :k] @ torch.diag_embed(S[..., :k]) @ Vh[..., :k, :]
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    err = (dense_delta(A_k, B_k) - best).norm() / best.norm()
    assert err < tol


def test_max_rank_above_total_rank_is_exact():
    As, Bs = random_segments(2, [3, 2], 20, 10)
    A, B = compose_adapters(As, Bs, max_rank=64)
    assert A.shape[-2] == 5
    torch.testing.assert_close(dense_delta(A, B), dense_delta(As[0], Bs[0]) + dense_delta(As[1], Bs[1]))


def test_weights_as_tensor():
    As, Bs = random_segments(2, [3, 2], 9, 6)
    A, _ = compose_adapters(As, Bs, weights=torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(A[:3], 2.0 * As[0])


@pytest.mark.parametrize("kwargs,name", [
    (dict(As=[], Bs=[]), "As"),
    (dict(As=[torch.randn(3, 8)], Bs=[]), "Bs"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(2, 4)]), "Bs\\[0\\]"),
    (dict(As=[torch.randn(3, 8), torch.randn(2, 9)], Bs=[torch.randn(3, 4), torch.randn(2, 4)]), "As\\[1\\]"),
    (dict(As=[torch.randn(3, 8), torch.randn(2, 8)], Bs=[torch.randn(3, 4), torch.randn(2, 5)]), "Bs\\[1\\]"),
    (dict(As=[torch.randn(2, 3, 8)], Bs=[torch.randn(3, 3, 4)]), "Bs\\[0\\]"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(3, 4)], weights=[1.0, 2.0]), "weights"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(3, 4)], bias=(torch.randn(2, 8),)), "bias"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(3, 4)], bias=(torch.randn(2, 7), torch.randn(2, 4))), "bias\\[0\\]"),
    (dict(As=[torch.randn(3, 8)], Bs=[torch.randn(3, 4)], max_rank=0), "max_rank"),
])
def test_bad_input_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        ops.compose_adapters(**kwargs, backend="torch")


def test_gradients_match_finite_differences():
    As, Bs = random_segments(2, [3, 2], 6, 5, lead=(2,), seed=11)
    bias = (torch.randn(2, 2, 6, dtype=torch.float64), torch.randn(2, 2, 5, dtype=torch.float64))
    leaves = [t.requires_grad_() for t in (*As, *Bs, *bias)]

    def concat(a0, a1, b0, b1, ab, bb):
        return compose_adapters([a0, a1], [b0, b1], weights=[0.5, -1.5], bias=(ab, bb))

    def recompressed_delta(a0, a1, b0, b1, ab, bb):
        A_k, B_k = compose_adapters([a0, a1], [b0, b1], weights=[0.5, -1.5], bias=(ab, bb), max_rank=3)
        return B_k.mT @ A_k  # the factors' signs are arbitrary; the rank-3 ΔW is not

    assert torch.autograd.gradcheck(concat, leaves)
    assert torch.autograd.gradcheck(recompressed_delta, leaves)
