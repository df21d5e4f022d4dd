"""`reference.swiglu_mlp` against its formula written out per element, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from v2l_fast import ops
from v2l_fast.reference import swiglu_mlp


def brute_force(x, gate, up, down):
    hidden = torch.zeros(*x.shape[:-1], gate.shape[0], dtype=torch.float64)
    for f in range(gate.shape[0]):
        g = (x.double() * gate[f].double()).sum(-1)
        hidden[..., f] = g / (1 + torch.exp(-g)) * (x.double() * up[f].double()).sum(-1)
    return hidden @ down.double().T


def test_matches_the_formula_and_keeps_leading_dims():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, generator=gen)
    gate, up, down = (torch.randn(11, 7, generator=gen), torch.randn(11, 7, generator=gen),
                      torch.randn(5, 11, generator=gen))
    out = swiglu_mlp(x, gate, up, down)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out.double(), brute_force(x, gate, up, down), rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(1)
    args = [torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
            for shape in ((4, 3), (6, 3), (6, 3), (2, 6))]
    assert torch.autograd.gradcheck(swiglu_mlp, args)


@pytest.mark.parametrize("bad,name", [
    (dict(x=torch.ones(3, 4, dtype=torch.long)), "x"),
    (dict(gate_weight=torch.randn(6, 5)), "gate_weight"),
    (dict(up_weight=torch.randn(7, 4)), "up_weight"),
    (dict(down_weight=torch.randn(2, 5)), "down_weight"),
    (dict(down_weight=torch.randn(2, 6, 1)), "down_weight"),
])
def test_bad_input_names_the_argument(bad, name):
    args = dict(x=torch.randn(3, 4), gate_weight=torch.randn(6, 4), up_weight=torch.randn(6, 4),
                down_weight=torch.randn(2, 6)) | bad
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        ops.swiglu_mlp(**args, backend="torch")
