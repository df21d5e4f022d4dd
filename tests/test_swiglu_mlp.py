"""The `swiglu_mlp` backends against the reference (fp64), forward and gradients: the torch
implementation (kernels/swiglu_mlp_torch.py, gate and up as one GEMM, row blocks without
autograd) and the Triton kernel (kernels/swiglu_mlp.py, under the interpreter without a GPU)."""

from __future__ import annotations

import pytest
import torch

from v2l_fast import ops
from v2l_fast.kernels import swiglu_mlp_torch
from v2l_fast.reference import swiglu_mlp as reference
from v2l_fast.testing import REL_TOLERANCE, assert_rel_close, rel_error

BACKENDS = ["torch", "triton"]


def implementation(name: str):
    """A backend's kernel-level function ``fn(x, gate_weight, up_weight, down_weight)``."""
    if name == "torch":
        return swiglu_mlp_torch.swiglu_mlp
    return pytest.importorskip("v2l_fast.kernels.swiglu_mlp").swiglu_mlp


def make_inputs(lead, H, F, D, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return rnd(*lead, H), rnd(F, H, scale=H ** -0.5), rnd(F, H, scale=H ** -0.5), rnd(D, F, scale=F ** -0.5)


def fp64_reference(x, gate, up, down):
    return reference(x.double(), gate.double(), up.double(), down.double())


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors, so unwritten outputs show."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 rows, so that the test shapes run several (and a partial last) block."""
    monkeypatch.setattr(swiglu_mlp_torch, "CHUNK_ROWS", 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,H,F,D", [
    ((1,), 16, 64, 16),
    ((3, 37), 48, 200, 40),      # odd token count, F and D not multiples of a tile
    ((2, 5, 7), 96, 96, 64),
    ((130,), 64, 256, 32),       # several token blocks
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference(backend, lead, H, F, D, dtype, device, poisoned_empty, small_blocks):
    x, gate, up, down = make_inputs(lead, H, F, D, dtype, device, sum(lead) + H + F)
    with torch.no_grad():
        out = implementation(backend)(x, gate, up, down)
    assert out.shape == (*lead, D) and out.dtype == dtype
    assert_rel_close(out, fp64_reference(x, gate, up, down).to(dtype), dtype)


@pytest.mark.triton
def test_triton_gate_up_activation_is_fully_written(device, poisoned_empty):
    kernel = pytest.importorskip("v2l_fast.kernels.swiglu_mlp")
    x, gate, up, _ = make_inputs((45,), 40, 72, 8, torch.float32, device, 3)
    h = kernel.gate_up_silu(x, gate, up)
    h_ref = torch.nn.functional.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T)
    assert_rel_close(h, h_ref.float(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_empty(backend, device, small_blocks):
    fn = implementation(backend)
    _, gate, up, down = make_inputs((1,), 32, 48, 24, torch.float32, device, 4)
    x = torch.randn(32, 19, device=device).T  # [19, 32], column-major
    assert_rel_close(fn(x, gate, up.T.contiguous().T, down), fp64_reference(x, gate, up, down).float(),
                     torch.float32)
    assert fn(x[:0], gate, up, down).shape == (0, 24)


def test_torch_blocks_equal_one_pass_and_mixed_dtypes_promote(small_blocks):
    """No-grad row blocks give the autograd path's result; fp16 x with fp32 weights gives fp32."""
    x, gate, up, down = make_inputs((3, 21), 40, 72, 24, torch.float32, "cpu", 8)
    with torch.no_grad():
        blocked = swiglu_mlp_torch.swiglu_mlp(x, gate, up, down)
    one_pass = swiglu_mlp_torch.swiglu_mlp(x, gate.requires_grad_(True), up, down)
    assert_rel_close(blocked, one_pass.detach(), tol=1e-6)
    mixed = swiglu_mlp_torch.swiglu_mlp(x.half(), gate.detach(), up, down)
    assert mixed.dtype == torch.float32
    assert_rel_close(mixed, fp64_reference(x.half(), gate, up, down).float(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference_autograd(backend, device):
    inputs = [t.requires_grad_(True) for t in make_inputs((3, 21), 40, 72, 24, torch.float32, device, 5)]
    grad_out = torch.randn(3, 21, 24, device=device)
    grads = torch.autograd.grad(implementation(backend)(*inputs), inputs, grad_out)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_grads = torch.autograd.grad(reference(*ref_inputs), ref_inputs, grad_out.double())
    for name, g, r in zip(("x", "gate_weight", "up_weight", "down_weight"), grads, ref_grads):
        err = rel_error(g, r.float())
        assert err <= REL_TOLERANCE[torch.float32], f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_dispatch_and_bad_input(backend, device):
    implementation(backend)  # skips triton when it is not installed
    x, gate, up, down = make_inputs((9,), 32, 64, 16, torch.float32, device, 6)
    assert_rel_close(ops.swiglu_mlp(x, gate, up, down, backend=backend),
                     fp64_reference(x, gate, up, down).float(), torch.float32)
    with pytest.raises(ValueError, match="up_weight"):
        ops.swiglu_mlp(x, gate, up[:, :5], down, backend=backend)


def test_auto_never_picks_the_interpreter_on_cpu():
    assert ops.resolve("swiglu_mlp", "auto", torch.device("cpu")).backend != "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_on_gpu(backend):
    x, gate, up, down = make_inputs((2, 1000), 960, 3840, 512, torch.bfloat16, torch.device("cuda"), 7)
    assert_rel_close(implementation(backend)(x, gate, up, down),
                     fp64_reference(x, gate, up, down).to(torch.bfloat16), torch.bfloat16)
