"""SwiGLU MLP ``down(silu(gate(x)) ⊙ up(x))`` in plain PyTorch, gate and up as one GEMM.

The ``backend="torch"`` of `v2l_fast.ops.swiglu_mlp`; imports no triton. The Perceiver's
modality projection (FRAMES2LORA_SPEC §3.2, H → 4H → D over every context row) is this op and
dominates the hypernetwork's FLOPs, so it is written for the GEMM library:

- ``[gate; up]`` stacked into one ``[2F, H]`` weight: ``x [T, H] @ [gate; up]ᵀ = [x gateᵀ | x upᵀ]``,
  one GEMM that reads each row of x once instead of twice;
- without autograd, rows go through in blocks of `CHUNK_ROWS`: the block's ``[rows, 2F]``
  pre-activations stay in the last-level cache between the gate/up GEMM, the in-place
  ``silu(g) ⊙ u`` and the down GEMM (which writes straight into the output), instead of
  making three round trips through memory as ``[T, F]`` tensors;
- with autograd, one pass of the same three steps (out-of-place, so autograd can save them).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Rows per block without autograd: the [rows, 2F] fp32 block is 2048·7680·4 B = 63 MB for the
# 500M projection (F = 3840); see bench/NOTES.md "CPU fast paths" for the measured choice.
CHUNK_ROWS = 2048


def swiglu_mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
               down_weight: torch.Tensor) -> torch.Tensor:
    """The torch backend of `v2l_fast.ops.swiglu_mlp` (arguments validated by the op).

    ``x [..., H]``, ``gate_weight, up_weight [F, H]``, ``down_weight [D, F]`` → ``[..., D]`` in
    the promoted dtype of all four, equal to the reference's three linears up to rounding
    (the same products, summed by one GEMM instead of two for gate and up).
    """
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in (x, gate_weight, up_weight, down_weight)))
    hidden = gate_weight.shape[0]
    gate_up = torch.cat([gate_weight, up_weight]).to(dtype)
    down = down_weight.to(dtype)
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_weight, up_weight, down_weight)):
        gate, up = F.linear(rows, gate_up).split(hidden, -1)
        out = F.linear(F.silu(gate) * up, down)
    else:
        device = rows.device.type  # under autocast the GEMMs write its dtype
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        out = torch.empty(rows.shape[0], down.shape[0], dtype=out_dtype, device=rows.device)
        down = down.to(out_dtype)  # a GEMM with out= is not cast by autocast
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            gate, up = F.linear(rows[start:start + CHUNK_ROWS], gate_up).split(hidden, -1)
            torch.matmul(F.silu(gate, inplace=True).mul_(up), down.mT, out=out[start:start + CHUNK_ROWS])
    return out.view(*x.shape[:-1], down.shape[0])
