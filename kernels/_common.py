"""Launch facts shared by the Triton kernel families; imports no triton, so `v2l_fast.ops` may use it."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET`` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; 4 elsewhere.

    The interpreter runs programs one after another: the split heuristics pretend to a small GPU
    so that key / K splitting still happens (and is tested) without multiplying the programs.
    """
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
