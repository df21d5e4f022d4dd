"""`lora_sgmv`: segmented multi-adapter LoRA with backend dispatch (see v2l_fast.reference.lora)."""

from __future__ import annotations

import torch

from v2l_fast.ops.backends import register, resolve, set_auto_order
from v2l_fast.reference import lora as reference

register("lora_sgmv", "torch", reference.lora_sgmv)
set_auto_order("lora_sgmv", cuda=("torch",), cpu=("torch",))


def lora_sgmv(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_adapter: torch.Tensor,
    *,
    ranks: torch.Tensor | None = None,
    layer: int | None = None,
    scaling: float = 1.0,
    base: torch.Tensor | None = None,
    check: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``base + scaling · Δ`` of per-segment LoRA adapters; see `v2l_fast.reference.lora_sgmv`.

    ``backend``: "auto" (default; ``$V2L_BACKEND`` overrides), "torch", "triton", "cuda", "cpp".
    """
    impl = resolve("lora_sgmv", backend, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
    return impl(x, A, B, seg_indptr, seg_adapter, ranks=ranks, layer=layer, scaling=scaling,
                base=base, check=check)
