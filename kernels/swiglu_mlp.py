"""Fused SwiGLU MLP for the Perceiver's modality projection (FRAMES2LORA_SPEC §3.2).

``down(silu(gate(x)) ⊙ up(x))``: the gate and up projections run as one GEMM kernel (each x
tile is loaded once and multiplied by both weight tiles, two fp32 accumulators) with
``silu(g)·u`` in its epilogue, so the two [T, F] pre-activations never reach memory; only the
activation ``h`` does, and the down GEMM is a plain cuBLAS matmul on it.

Backward recomputes: the saved tensors are the inputs only, and the backward runs the
reference's three linears under autograd to get every gradient (x and all three weights).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from v2l_fast.kernels._common import dot_config


@triton.jit
def _gate_up_silu_kernel(
    x_ptr, gate_ptr, up_ptr, h_ptr, T, F, H,
    stride_xt, stride_xh, stride_gf, stride_gh, stride_uf, stride_uh, stride_ht,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, BLOCK_K)
    acc_gate = tl.zeros([BLOCK_T, BLOCK_F], tl.float32)
    acc_up = tl.zeros([BLOCK_T, BLOCK_F], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + k[None, :] * stride_xh,
                    mask=(offs_t[:, None] < T) & (k[None, :] < H), other=0.0).to(DOT_DTYPE)
        fk_inside = (offs_f[:, None] < F) & (k[None, :] < H)
        w_gate = tl.load(gate_ptr + offs_f[:, None] * stride_gf + k[None, :] * stride_gh,
                         mask=fk_inside, other=0.0).to(DOT_DTYPE)
        w_up = tl.load(up_ptr + offs_f[:, None] * stride_uf + k[None, :] * stride_uh,
                       mask=fk_inside, other=0.0).to(DOT_DTYPE)
        acc_gate = tl.dot(x, tl.trans(w_gate), acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=PRECISION)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(h_ptr + offs_t[:, None] * stride_ht + offs_f[None, :], h.to(h_ptr.dtype.element_ty),
             mask=(offs_t[:, None] < T) & (offs_f[None, :] < F))


def _cuda_tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_T, BLOCK_F, BLOCK_K, num_warps)`` on a GPU, 3 stages.

    Picked from ptxas's register/spill report, not from timings (bench/NOTES.md "compile
    check"): both are spill-free for sm_80 and sm_90. fp32 runs the exact (FMA) dot, whose two
    accumulators do not fit a 128 × 128 tile in registers.
    """
    return (128, 128, 32, 8) if dtype in (torch.float16, torch.bfloat16) else (64, 64, 32, 8)


def gate_up_silu(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """``silu(x gate_weightᵀ) ⊙ (x up_weightᵀ)`` for a 2-D ``x [T, H]``, one fused launch."""
    T, H = x.shape
    F_ = gate_weight.shape[0]
    h = torch.empty(T, F_, device=x.device, dtype=x.dtype)
    if T == 0 or F_ == 0:
        return h
    on_gpu = x.device.type == "cuda"
    block_t, block_f, block_k, num_warps = _cuda_tiles(x.dtype) if on_gpu else (32, 64, 32, 4)
    dot_dtype, precision = dot_config(x.dtype)
    grid = (triton.cdiv(T, block_t), triton.cdiv(F_, block_f))
    _gate_up_silu_kernel[grid](
        x, gate_weight, up_weight, h, T, F_, H, *x.stride(), *gate_weight.stride(),
        *up_weight.stride(), h.stride(0), BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_K=block_k,
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=num_warps,
        num_stages=3 if on_gpu else 1)
    return h


class SwiGLU(torch.autograd.Function):
    """Fused forward; backward recomputes through the reference's linears."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, down_weight):
        ctx.save_for_backward(x, gate_weight, up_weight, down_weight)
        h = gate_up_silu(x.reshape(-1, x.shape[-1]), gate_weight, up_weight)
        return F.linear(h, down_weight).view(*x.shape[:-1], down_weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_(need)
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            out = F.linear(F.silu(F.linear(inputs[0], inputs[1])) * F.linear(inputs[0], inputs[2]),
                           inputs[3])
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return tuple(next(grads) if t.requires_grad else None for t in inputs)


def swiglu_mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
               down_weight: torch.Tensor) -> torch.Tensor:
    """The Triton backend of `v2l_fast.ops.swiglu_mlp` (arguments validated by the op).

    Same result and gradients as `v2l_fast.reference.swiglu_mlp`. Inputs and weights are
    brought to one dtype (their promotion) first, as the GEMMs need.
    """
    dtype = functools.reduce(torch.promote_types,
                             (t.dtype for t in (x, gate_weight, up_weight, down_weight)))
    return SwiGLU.apply(x.to(dtype), gate_weight.to(dtype), up_weight.to(dtype),
                        down_weight.to(dtype))
