"""`lora_sgmv`: segmented multi-adapter LoRA with backend dispatch (see v2l_fast.reference.lora_sgmv).

Backends: "torch" (the reference), "triton" (shrink/expand kernels with autograd, prefill,
decode and training), "cuda" (compiled decode kernel, shrink and expand in one launch) and
"cpp" (compiled CPU kernel). The compiled kernels are forward-only: when a gradient is needed
they hand over to the differentiable backend of the same device (triton, resp. torch).

For a batch run through every decoder layer, build the token grouping once with
`lora_sgmv_metadata` and pass it as ``metadata=`` (the kernel backends otherwise rebuild it
only when the seg tensors change).
"""

from __future__ import annotations

import torch

from v2l_fast._ext import require_extension
from v2l_fast.kernels.lora_sgmv_metadata import LoraSgmvMetadata, resolve_metadata
from v2l_fast.kernels.lora_sgmv_metadata import lora_sgmv_metadata as _build_metadata
from v2l_fast.ops.backends import register, resolve, set_auto_order
import sys
import v2l_fast.reference.lora_sgmv  # noqa: F401
reference = sys.modules["v2l_fast.reference.lora_sgmv"]

__all__ = ["LoraSgmvMetadata", "lora_sgmv", "lora_sgmv_metadata"]


def lora_sgmv_metadata(seg_indptr: torch.Tensor, seg_adapter: torch.Tensor, num_tokens: int,
                       num_adapters: int) -> LoraSgmvMetadata:
    """Group a batch's tokens by adapter once (no host sync); pass the result as ``metadata=``
    to every `lora_sgmv` call of the batch (every layer, forward and backward).

    ``num_tokens`` is T (``x.shape[0]``), ``num_adapters`` is n (``A.shape[0]``).
    """
    return _build_metadata(seg_indptr, seg_adapter, num_tokens, num_adapters)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _lora_sgmv_cpp(x, A, B, seg_indptr, seg_adapter, *, ranks=None, layer=None, scaling=1.0, base=None,
                   check=True, metadata=None):
    """C++ CPU forward (`v2l_fast._C.lora_sgmv_cpu`, fp32 accumulation); the reference when a
    gradient is needed or an input is fp64 (whose contract is fp64 accumulation)."""
    reference.check_lora_sgmv_args(x, A, B, seg_indptr, seg_adapter, ranks=ranks, layer=layer, base=base,
                                   check_values=check)
    if _needs_grad(x, A, B, base) or any(t is not None and t.dtype == torch.float64 for t in (x, A, B, base)):
        return reference.lora_sgmv(x, A, B, seg_indptr, seg_adapter, ranks=ranks, layer=layer, scaling=scaling,
                                   base=base, check=False)
    if layer is not None:
        A, B = A[:, layer], B[:, layer]
    return require_extension().lora_sgmv_cpu(x, A, B, seg_indptr, seg_adapter, ranks, float(scaling), base)


def _lora_sgmv_cuda(x, A, B, seg_indptr, seg_adapter, *, ranks=None, layer=None, scaling=1.0, base=None,
                    check=True, metadata=None):
    """CUDA decode kernel (`v2l_fast._C.lora_sgmv_cuda`); with a gradient needed, triton's autograd."""
    reference.check_lora_sgmv_args(x, A, B, seg_indptr, seg_adapter, ranks=ranks, layer=layer, base=base,
                                   check_values=check)
    if _needs_grad(x, A, B, base):
        from v2l_fast.kernels.lora_sgmv import lora_sgmv as triton_lora_sgmv

        return triton_lora_sgmv(x, A, B, seg_indptr, seg_adapter, ranks=ranks, layer=layer, scaling=scaling,
                                base=base, check=False, metadata=metadata)
    meta = resolve_metadata(metadata, seg_indptr, seg_adapter, x.shape[0], A.shape[0])
    if layer is not None:
        A, B = A[:, layer], B[:, layer]
    return require_extension().lora_sgmv_cuda(x, A, B, ranks, float(scaling), base, meta.sorted_tokens,
                                              meta.work_group, meta.work_start, meta.work_end)


register("lora_sgmv", "torch", reference.lora_sgmv)
register("lora_sgmv", "triton", "v2l_fast.kernels.lora_sgmv:lora_sgmv")
register("lora_sgmv", "cuda", _lora_sgmv_cuda)
register("lora_sgmv", "cpp", _lora_sgmv_cpp)
# GPU order is by design, unmeasured (no GPU lent yet). CPU: cpp beat torch on every row of
# bench/results/bench_lora_sgmv_cpu.json (decode 1.4-4.5x, prefill 1.7x; see bench/NOTES.md).
set_auto_order("lora_sgmv", cuda=("triton", "torch"), cpu=("cpp", "torch"))


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
    metadata: LoraSgmvMetadata | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``base + scaling · Δ`` of per-segment LoRA adapters; see `v2l_fast.reference.lora_sgmv`.

    ``metadata``: the batch's `lora_sgmv_metadata`, reused by every layer (optional).
    ``backend``: "auto" (default; ``$V2L_BACKEND`` overrides), "torch", "triton", "cuda", "cpp".
    """
    impl = resolve("lora_sgmv", backend, x)
    return impl(x, A, B, seg_indptr, seg_adapter, ranks=ranks, layer=layer, scaling=scaling,
                base=base, check=check, metadata=metadata)
