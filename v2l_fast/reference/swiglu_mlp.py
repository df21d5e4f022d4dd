"""SwiGLU MLP without biases, the reference: ``down(silu(gate(x)) ⊙ up(x))``.

The Perceiver's modality projection (docs/method.md §3.2, H → 4H → D over every context
row) and its blocks' MLPs (§3.4 step 7) are this op; the projection dominates the
hypernetwork's FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    return F.linear(F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight), down_weight)
