"""Helpers shared by the kernel families (Triton and torch); importing this module imports no
triton, so `v2l_fast.ops` and the torch implementations may use it."""

from __future__ import annotations

import os

import torch

# The log-sum-exp of a row with no kept key, and the score given to a masked key: finite, so that
# ``exp(score - lse)`` is 0 (or a finite number times a weight of exactly 0), never NaN.
EMPTY_LSE = -1e30


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET`` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; 4 elsewhere.

    The interpreter runs programs one after another: the split heuristics pretend to a small GPU
    so that key / K splitting still happens (and is tested) without multiplying the programs.
    """
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def dot_config(dtype: torch.dtype) -> tuple:
    """``tl.dot`` operand dtype and precision for inputs of ``dtype``: half stays half, fp32 is exact.

    Imports triton when called (only the Triton launch wrappers call it).
    """
    import triton.language as tl

    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Idefics2 RMSNorm (FRAMES2LORA_SPEC §3.3): ``weight · cast(x · rsqrt(mean(x²) + eps))``.

    The statistics run in fp32 (fp64 stays fp64) and the normalised value is cast back to the
    input dtype before the gain multiplies it, so the result has the promoted dtype of both.
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
