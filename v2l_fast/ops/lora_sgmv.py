"""`lora_sgmv`: segmented multi-adapter LoRA with backend dispatch (see v2l_fast.reference.lora_sgmv).

Backends: "torch" (batched GEMMs over runs of one adapter, else the reference's loop),
"triton" (shrink/expand kernels with autograd, prefill, decode and training), "cuda" (compiled
decode kernel, shrink and expand in one launch) and "cpp" (compiled CPU kernel). The compiled
kernels are forward-only: when a gradient is needed they hand over to the differentiable
backend of the same device (torch, resp. triton).

Kernel arguments (what every backend takes, positionally; the public op prepares them)::

    x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m

with ``A``/``B`` one layer's ``[n, R, ·]`` factors and ``work``/``block_m`` the batch's
`LoraSgmvMetadata` tensors for the backends that walk work tiles (triton, cuda; empty for the
others). A hot loop builds them once per batch (`kernel_segments`) and calls the `Resolved`
backend directly; `v2l_fast.vlm.LoRAPatch` does.
"""

from __future__ import annotations

import torch

from v2l_fast._ext import require_extension
from v2l_fast.errors import fail
from v2l_fast.kernels.lora_sgmv_metadata import LoraSgmvMetadata
from v2l_fast.kernels.lora_sgmv_metadata import lora_sgmv_metadata as build_metadata
from v2l_fast.kernels.lora_sgmv_torch import lora_sgmv as torch_lora_sgmv
from v2l_fast.ops import checks
from v2l_fast.ops.registry import Resolved, define_op, kernel_schema
from v2l_fast.reference.lora_sgmv import lora_sgmv as reference

__all__ = ["LoraSgmvMetadata", "kernel_segments", "lora_sgmv", "lora_sgmv_metadata"]

# Backends that walk the metadata's work tiles; the others read seg_indptr / seg_adapter.
_WORK_TILED = frozenset({"triton", "cuda"})


def lora_sgmv_metadata(seg_indptr: torch.Tensor, seg_adapter: torch.Tensor, num_tokens: int,
                       num_adapters: int) -> LoraSgmvMetadata:
    """Group a batch's tokens by adapter once (no host sync); pass the result as ``metadata=``
    to every `lora_sgmv` call of the batch (every layer, forward and backward).

    ``num_tokens`` is T (``x.shape[0]``), ``num_adapters`` is n (``A.shape[0]``).
    """
    if not isinstance(seg_indptr, torch.Tensor) or seg_indptr.dim() != 1 or seg_indptr.numel() < 1:
        fail("seg_indptr", "a 1-D int tensor [S+1]", seg_indptr)
    if not isinstance(seg_adapter, torch.Tensor) or seg_adapter.shape != (seg_indptr.numel() - 1,):
        fail("seg_adapter", f"a 1-D int tensor [S] = [{seg_indptr.numel() - 1}]", seg_adapter)
    if not isinstance(num_tokens, int) or num_tokens < 0:
        fail("num_tokens", "an int >= 0", num_tokens)
    if not isinstance(num_adapters, int) or num_adapters < 0:
        fail("num_adapters", "an int >= 0", num_adapters)
    return build_metadata(seg_indptr, seg_adapter, num_tokens, num_adapters)


def kernel_segments(kernel: Resolved, seg_indptr: torch.Tensor, seg_adapter: torch.Tensor, num_tokens: int,
                    num_adapters: int, metadata: LoraSgmvMetadata | None = None) -> tuple[list[torch.Tensor], int]:
    """``(work, block_m)`` kernel arguments of one batch for ``kernel``'s backend.

    Work-tiled backends get ``metadata``'s tensors (built here when None); the others need
    none, so nothing is built for them.
    """
    if kernel.backend not in _WORK_TILED:
        return [], 0
    if metadata is None:
        metadata = build_metadata(seg_indptr, seg_adapter, num_tokens, num_adapters)
    return metadata.tensors(), metadata.block_m


def _needs_grad(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                        or (base is not None and base.requires_grad))


def _reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, seg_indptr: torch.Tensor,
               seg_adapter: torch.Tensor, ranks: torch.Tensor | None, scaling: float, base: torch.Tensor | None,
               work: list[torch.Tensor], block_m: int) -> torch.Tensor:
    """The reference's per-adapter loop on kernel arguments (this signature is the op's schema)."""
    return reference(x, A, B, seg_indptr, seg_adapter, ranks=ranks, scaling=scaling, base=base)


def _torch(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m):
    """Batched GEMMs over runs of one adapter (training batches), else the reference's loop.

    Outside autocast: the contract is fp32 accumulation, and ATen's matmuls would otherwise run in
    the autocast dtype (the triton and cuda kernels are untouched by autocast; the LoRA's rank-R
    GEMMs are a small share of a step)."""
    with torch.autocast(x.device.type, enabled=False):
        return torch_lora_sgmv(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m,
                               fallback=_reference)


def _cpp(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m):
    """C++ CPU forward (`v2l_fast._C.lora_sgmv_cpu`, fp32 accumulation, outside autocast as `_torch`);
    the torch backend when a gradient is needed or an input is fp64 (whose contract is fp64
    accumulation)."""
    fp64 = torch.float64 in (x.dtype, A.dtype, B.dtype, base.dtype if base is not None else None)
    if fp64 or _needs_grad(x, A, B, base):
        return _torch(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m)
    with torch.autocast(x.device.type, enabled=False):
        return require_extension().lora_sgmv_cpu(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base)


def _cuda(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m):
    """CUDA decode kernel (`v2l_fast._C.lora_sgmv_cuda`); with a gradient needed, triton's autograd."""
    if _needs_grad(x, A, B, base):
        from v2l_fast.kernels.lora_sgmv import lora_sgmv as triton_lora_sgmv

        return triton_lora_sgmv(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m)
    sorted_tokens, _, _, work_group, work_start, work_end = work
    return require_extension().lora_sgmv_cuda(x, A, B, ranks, scaling, base, sorted_tokens, work_group,
                                              work_start, work_end)


def _output_like(x, A, B, seg_indptr, seg_adapter, ranks, scaling, base, work, block_m):
    return x.new_empty(x.shape[0], B.shape[-1], dtype=base.dtype if base is not None else x.dtype)


def _prepare(a, kernel: Resolved) -> torch.Tensor:
    A, B = (a.A, a.B) if a.layer is None else (a.A[:, a.layer], a.B[:, a.layer])  # strided views, no copy
    work, block_m = kernel_segments(kernel, a.seg_indptr, a.seg_adapter, a.x.shape[0], a.A.shape[0], a.metadata)
    return kernel(a.x, A, B, a.seg_indptr, a.seg_adapter, a.ranks, float(a.scaling), a.base, work, block_m)


lora_sgmv = define_op(
    reference, check=checks.lora_sgmv, device_of=lambda a: a.x.device, prepare=_prepare,
    extras={"metadata": None}, schema=kernel_schema(_reference), fake=_output_like,
    # GPU order is by design, unmeasured (no GPU lent yet). CPU: cpp beat torch on every row of
    # bench/results/bench_lora_sgmv_cpu.json (decode 1.4-4.5x, prefill 1.7x; see bench/NOTES.md).
    auto={"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")})
lora_sgmv.op.register("torch", _torch)
lora_sgmv.op.register("triton", "v2l_fast.kernels.lora_sgmv:lora_sgmv")
lora_sgmv.op.register("cuda", _cuda)
lora_sgmv.op.register("cpp", _cpp)
