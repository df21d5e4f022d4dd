"""`swiglu_mlp` with backend dispatch (see v2l_fast.reference.swiglu_mlp)."""

from __future__ import annotations

import torch

from v2l_fast.ops.backends import register, resolve, set_auto_order
import sys
import v2l_fast.reference.swiglu_mlp  # noqa: F401
reference = sys.modules["v2l_fast.reference.swiglu_mlp"]

register("swiglu_mlp", "torch", reference.swiglu_mlp)
register("swiglu_mlp", "triton", "v2l_fast.kernels.swiglu_mlp:swiglu_mlp")
set_auto_order("swiglu_mlp", cuda=("triton", "torch"), cpu=("torch",))


def swiglu_mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
               down_weight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """SwiGLU MLP without biases; see `v2l_fast.reference.swiglu_mlp`.

    ``backend``: "auto" (default; ``$V2L_BACKEND`` overrides), "torch", "triton".
    """
    impl = resolve("swiglu_mlp", backend, x)
    return impl(x, gate_weight, up_weight, down_weight)
