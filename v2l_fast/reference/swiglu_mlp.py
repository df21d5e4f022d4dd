"""SwiGLU MLP without biases, the reference: ``down(silu(gate(x)) ⊙ up(x))``.

The Perceiver's modality projection (FRAMES2LORA_SPEC §3.2, H → 4H → D over every context
row) and its blocks' MLPs (§3.4 step 7) are this op; the projection dominates the
hypernetwork's FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v2l_fast.errors import check_tensor, describe, fail


def check_swiglu_args(x, gate_weight, up_weight, down_weight) -> None:
    """Validate `swiglu_mlp` arguments; raise ValueError naming the offending one."""
    check_tensor("x", x, floating=True, shape_hint="[..., H]")
    if x.dim() < 1:
        fail("x", "a tensor with a last dim H", describe(x))
    H = x.shape[-1]
    check_tensor("gate_weight", gate_weight, ndim=2, floating=True, device=x.device, shape_hint="[F, H]")
    if gate_weight.shape[1] != H:
        fail("gate_weight", f"shape [F, {H}] (H = width of x)", describe(gate_weight))
    F_ = gate_weight.shape[0]
    check_tensor("up_weight", up_weight, ndim=2, floating=True, device=x.device, shape_hint=f"[{F_}, {H}]")
    if tuple(up_weight.shape) != (F_, H):
        fail("up_weight", f"shape [{F_}, {H}] like gate_weight", describe(up_weight))
    check_tensor("down_weight", down_weight, ndim=2, floating=True, device=x.device, shape_hint=f"[D, {F_}]")
    if down_weight.shape[1] != F_:
        fail("down_weight", f"shape [D, {F_}]", describe(down_weight))


def swiglu_mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
               down_weight: torch.Tensor) -> torch.Tensor:
    """``down_weight @ (silu(gate_weight @ x) ⊙ (up_weight @ x))`` on the last dim of ``x``.

    Args:
        x: ``[..., H]``.
        gate_weight, up_weight: ``[F, H]`` (nn.Linear layout, no bias).
        down_weight: ``[D, F]``.

    Returns:
        ``[..., D]``, computed as three plain linears (the official module's order).
    """
    check_swiglu_args(x, gate_weight, up_weight, down_weight)
    return F.linear(F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight), down_weight)
