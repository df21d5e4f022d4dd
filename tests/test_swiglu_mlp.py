"""Triton `swiglu_mlp` (kernels/swiglu_mlp.py) against the reference, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from v2l_fast import ops
from v2l_fast.ops.backends import resolve
from v2l_fast.reference import swiglu_mlp as reference
from v2l_fast.testing import REL_TOLERANCE, assert_rel_close, rel_error

kernel = pytest.importorskip("v2l_fast.kernels.swiglu_mlp")


def make_inputs(lead, H, F, D, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return rnd(*lead, H), rnd(F, H, scale=H ** -0.5), rnd(F, H, scale=H ** -0.5), rnd(D, F, scale=F ** -0.5)


def fp64_reference(x, gate, up, down):
    return reference(x.double(), gate.double(), up.double(), down.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,H,F,D", [
    ((1,), 16, 64, 16),
    ((3, 37), 48, 200, 40),      # odd token count, F and D not multiples of a tile
    ((2, 5, 7), 96, 96, 64),
    ((130,), 64, 256, 32),       # several token blocks
])
def test_forward_matches_reference(lead, H, F, D, dtype, device):
    x, gate, up, down = make_inputs(lead, H, F, D, dtype, device, sum(lead) + H + F)
    h = kernel.gate_up_silu(x.reshape(-1, H), gate, up)
    h_ref = torch.nn.functional.silu(x.double().reshape(-1, H) @ gate.double().T) * (
        x.double().reshape(-1, H) @ up.double().T)
    assert_rel_close(h, h_ref.to(dtype), dtype)
    out = kernel.swiglu_mlp(x, gate, up, down)
    assert out.shape == (*lead, D) and out.dtype == dtype
    assert_rel_close(out, fp64_reference(x, gate, up, down).to(dtype), dtype)


def test_poisoned_output_is_fully_written(device, monkeypatch):
    x, gate, up, _ = make_inputs((45,), 40, 72, 8, torch.float32, device, 3)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    h = kernel.gate_up_silu(x, gate, up)
    assert bool(torch.isfinite(h).all())


def test_non_contiguous_input_and_empty(device):
    _, gate, up, down = make_inputs((1,), 32, 48, 24, torch.float32, device, 4)
    x = torch.randn(32, 19, device=device).T  # [19, 32], column-major
    assert_rel_close(kernel.swiglu_mlp(x, gate, up, down),
                     fp64_reference(x, gate, up, down).float(), torch.float32)
    assert kernel.swiglu_mlp(x[:0], gate, up, down).shape == (0, 24)


def test_gradients_match_reference_autograd(device):
    inputs = [t.requires_grad_(True) for t in make_inputs((3, 21), 40, 72, 24, torch.float32, device, 5)]
    grad_out = torch.randn(3, 21, 24, device=device)
    grads = torch.autograd.grad(kernel.swiglu_mlp(*inputs), inputs, grad_out)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_grads = torch.autograd.grad(reference(*ref_inputs), ref_inputs, grad_out.double())
    for name, g, r in zip(("x", "gate_weight", "up_weight", "down_weight"), grads, ref_grads):
        err = rel_error(g, r.float())
        assert err <= REL_TOLERANCE[torch.float32], f"d{name}: relative error {err:.2e}"


def test_ops_dispatch_and_bad_input(device):
    x, gate, up, down = make_inputs((9,), 32, 64, 16, torch.float32, device, 6)
    assert resolve("swiglu_mlp", "triton", device) is kernel.swiglu_mlp
    if device.type == "cpu":  # auto never picks the interpreter
        assert resolve("swiglu_mlp", "auto", device) is not kernel.swiglu_mlp
    assert_rel_close(ops.swiglu_mlp(x, gate, up, down, backend="triton"),
                     fp64_reference(x, gate, up, down).float(), torch.float32)
    with pytest.raises(ValueError, match="up_weight"):
        ops.swiglu_mlp(x, gate, up[:, :5], down, backend="triton")


@pytest.mark.gpu
def test_bf16_on_gpu():
    x, gate, up, down = make_inputs((2, 1000), 960, 3840, 512, torch.bfloat16, torch.device("cuda"), 7)
    assert_rel_close(kernel.swiglu_mlp(x, gate, up, down),
                     fp64_reference(x, gate, up, down).to(torch.bfloat16), torch.bfloat16)
