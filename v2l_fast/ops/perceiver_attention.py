"""`perceiver_attention` with backend dispatch (see v2l_fast.reference.perceiver_attention)."""

from __future__ import annotations

import torch

from v2l_fast.ops.backends import register, resolve, set_auto_order
import sys
import v2l_fast.reference.perceiver_attention  # noqa: F401
reference = sys.modules["v2l_fast.reference.perceiver_attention"]

register("perceiver_attention", "torch", reference.perceiver_attention)
register("perceiver_attention", "triton", "v2l_fast.kernels.perceiver_attention:perceiver_attention")
set_auto_order("perceiver_attention", cuda=("triton", "torch"), cpu=("torch",))


def perceiver_attention(
    latents: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    *,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    o_weight: torch.Tensor,
    latents_norm_weight: torch.Tensor,
    context_norm_weight: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    eps: float = 1e-6,
    check: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Perceiver cross-attention over ``[context ; latents]``; see the reference for semantics.

    ``backend``: "auto" (default; ``$V2L_BACKEND`` overrides), "torch", "triton".
    """
    impl = resolve("perceiver_attention", backend, latents)
    return impl(latents, context, context_mask, q_weight=q_weight, k_weight=k_weight,
                v_weight=v_weight, o_weight=o_weight, latents_norm_weight=latents_norm_weight,
                context_norm_weight=context_norm_weight, num_heads=num_heads,
                num_kv_heads=num_kv_heads, eps=eps, check=check)
