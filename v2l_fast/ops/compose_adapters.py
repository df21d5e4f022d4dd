"""`compose_adapters` with backend dispatch (see v2l_fast.reference.compose_adapters)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from v2l_fast.ops.backends import register, resolve, set_auto_order
import sys
import v2l_fast.reference.compose_adapters  # noqa: F401
reference = sys.modules["v2l_fast.reference.compose_adapters"]

register("compose_adapters", "torch", reference.compose_adapters)
set_auto_order("compose_adapters", cuda=("torch",), cpu=("torch",))


def compose_adapters(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    bias: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_rank: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-space composition of segment adapters; see `v2l_fast.reference.compose_adapters`.

    ``backend``: "auto" (default; ``$V2L_BACKEND`` overrides), "torch".
    """
    impl = resolve("compose_adapters", backend, As[0] if isinstance(As, Sequence) and As else None)
    return impl(As, Bs, weights=weights, bias=bias, max_rank=max_rank)
