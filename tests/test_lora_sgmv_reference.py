"""`reference.lora_sgmv` against a brute-force per-token loop, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from v2l_fast import ops
from v2l_fast.reference import lora_sgmv
from v2l_fast.testing import assert_rel_close


def brute_force_sgmv(x, A, B, indptr, adapters, ranks, scaling, base):
    """Independent ground truth: one token and one rank row at a time, in fp64."""
    T, O = x.shape[0], B.shape[-1]
    y = torch.zeros(T, O, dtype=torch.float64) if base is None else base.double().clone()
    ptr = indptr.tolist()
    for s, a in enumerate(adapters.tolist()):
        if a < 0:
            continue
        r = A.shape[1] if ranks is None else int(ranks[a])
        for t in range(ptr[s], ptr[s + 1]):
            for k in range(r):
                y[t] += scaling * torch.dot(x[t].double(), A[a, k].double()) * B[a, k].double()
    return y


def random_segments(T, S, n, gen, *, allow_none=True):
    cuts = torch.sort(torch.randint(0, T + 1, (S - 1,), generator=gen)).values
    indptr = torch.cat([torch.tensor([0]), cuts, torch.tensor([T])])
    low = -1 if allow_none else 0
    return indptr, torch.randint(low, n, (S,), generator=gen)


@pytest.mark.parametrize("I,O,R,T,S,n", [
    (2560, 960, 16, 9, 4, 3),
    (8192, 2048, 32, 5, 3, 2),
    (1000, 777, 1, 7, 5, 4),
    (33, 17, 64, 12, 6, 5),
    (64, 48, 8, 1, 1, 1),
])
@pytest.mark.parametrize("with_base", [False, True])
def test_matches_brute_force(I, O, R, T, S, n, with_base):
    gen = torch.Generator().manual_seed(I + O + R + T)
    x = torch.randn(T, I, generator=gen)
    A = torch.randn(n, R, I, generator=gen) / I**0.5
    B = torch.randn(n, R, O, generator=gen)
    indptr, adapters = random_segments(T, S, n, gen)
    ranks = torch.randint(0, R + 1, (n,), generator=gen)
    base = torch.randn(T, O, generator=gen) if with_base else None
    out = lora_sgmv(x, A, B, indptr, adapters, ranks=ranks, scaling=0.75, base=base)
    ref = brute_force_sgmv(x, A, B, indptr, adapters, ranks, 0.75, base)
    assert out.dtype == torch.float32
    assert_rel_close(out, ref.float(), torch.float32)


def test_layer_pool_picks_the_layer():
    gen = torch.Generator().manual_seed(1)
    n, L, R, I, O, T = 3, 4, 8, 40, 24, 10
    A, B = torch.randn(n, L, R, I, generator=gen), torch.randn(n, L, R, O, generator=gen)
    x = torch.randn(T, I, generator=gen)
    indptr, adapters = torch.tensor([0, 3, 3, 10]), torch.tensor([2, 0, 1])
    for layer in range(L):
        out = lora_sgmv(x, A, B, indptr, adapters, layer=layer)
        ref = brute_force_sgmv(x, A[:, layer], B[:, layer], indptr, adapters, None, 1.0, None)
        assert_rel_close(out, ref.float(), torch.float32)


def test_empty_segments_and_all_none():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 16, generator=gen)
    A, B = torch.randn(2, 4, 16, generator=gen), torch.randn(2, 4, 8, generator=gen)
    base = torch.randn(6, 8, generator=gen)
    out = lora_sgmv(x, A, B, torch.tensor([0, 0, 6, 6]), torch.tensor([0, -1, 1]), base=base)
    assert torch.equal(out, base)
    assert torch.count_nonzero(lora_sgmv(x, A, B, torch.tensor([0, 6]), torch.tensor([-1]))) == 0
    empty = lora_sgmv(x[:0], A, B, torch.tensor([0]), torch.tensor([], dtype=torch.long))
    assert empty.shape == (0, 8)


def test_does_not_modify_base_and_keeps_its_dtype():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    A, B = torch.randn(1, 2, 16), torch.randn(1, 2, 8)
    base = torch.randn(4, 8, dtype=torch.bfloat16)
    before = base.clone()
    out = lora_sgmv(x, A, B, torch.tensor([0, 4]), torch.tensor([0]), base=base, scaling=2.0)
    assert torch.equal(base, before) and out.dtype == torch.bfloat16
    ref = base.float() + 2.0 * (x.float() @ A[0].T) @ B[0]
    assert_rel_close(out.float(), ref, torch.bfloat16)


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(3)
    n, L, R, I, O, T = 3, 2, 3, 7, 5, 6
    x = torch.randn(T, I, dtype=torch.float64, generator=gen, requires_grad=True)
    A = torch.randn(n, L, R, I, dtype=torch.float64, generator=gen, requires_grad=True)
    B = torch.randn(n, L, R, O, dtype=torch.float64, generator=gen, requires_grad=True)
    base = torch.randn(T, O, dtype=torch.float64, generator=gen, requires_grad=True)
    indptr, adapters, ranks = torch.tensor([0, 2, 2, 5, 6]), torch.tensor([1, 0, -1, 2]), torch.tensor([3, 2, 1])
    fn = lambda x, A, B, base: lora_sgmv(x, A, B, indptr, adapters, ranks=ranks, layer=1, scaling=1.5, base=base)
    assert torch.autograd.gradcheck(fn, (x, A, B, base))


def _args():
    return dict(x=torch.randn(5, 8), A=torch.randn(2, 3, 8), B=torch.randn(2, 3, 4),
                seg_indptr=torch.tensor([0, 2, 5]), seg_adapter=torch.tensor([0, 1]))


@pytest.mark.parametrize("change,name", [
    (dict(x=torch.randn(5, 8, 1)), "x"),
    (dict(x=torch.ones(5, 8, dtype=torch.long)), "x"),
    (dict(A=torch.randn(2, 3, 9)), "A"),
    (dict(A=[[1.0]]), "A"),
    (dict(B=torch.randn(3, 3, 4)), "B"),
    (dict(B=torch.randn(2, 3)), "B"),
    (dict(seg_indptr=torch.tensor([0, 6, 5])), "seg_indptr"),
    (dict(seg_indptr=torch.tensor([0, 2, 4])), "seg_indptr"),
    (dict(seg_indptr=torch.tensor([1, 2, 5])), "seg_indptr"),
    (dict(seg_indptr=torch.tensor([0.0, 2.0, 5.0])), "seg_indptr"),
    (dict(seg_adapter=torch.tensor([0, 2])), "seg_adapter"),
    (dict(seg_adapter=torch.tensor([-2, 0])), "seg_adapter"),
    (dict(seg_adapter=torch.tensor([0])), "seg_adapter"),
    (dict(ranks=torch.tensor([1, 4])), "ranks"),
    (dict(ranks=torch.tensor([1])), "ranks"),
    (dict(layer=0), "layer"),
    (dict(base=torch.randn(5, 5)), "base"),
    (dict(A=torch.randn(2, 4, 3, 8), B=torch.randn(2, 4, 3, 4)), "layer"),
    (dict(A=torch.randn(2, 4, 3, 8), B=torch.randn(2, 4, 3, 4), layer=4), "layer"),
])
def test_bad_input_names_the_argument(change, name):
    args = _args() | change
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        ops.lora_sgmv(**args, backend="torch")


def test_check_false_skips_only_value_checks():
    args = _args() | dict(seg_adapter=torch.tensor([0, 1]))
    ops.lora_sgmv(**args, check=False, backend="torch")
    with pytest.raises(ValueError, match="^A: expected"):
        ops.lora_sgmv(**(args | dict(A=torch.randn(2, 3, 9))), check=False, backend="torch")
