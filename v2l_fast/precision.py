"""Where bf16 pays: does a device multiply bf16 matrices in hardware, faster than fp32.

Training autocasts to bf16 (``TrainConfig.bf16``, on by default) only where this module says the
device multiplies bf16 in hardware; elsewhere bf16 would be emulated, slower than fp32, and
training stays in fp32:

- CUDA GPUs that support bf16 (Ampere and later; the spec's own setting);
- x86 CPUs with AMX (Intel Sapphire Rapids and later): oneDNN runs bf16 GEMMs on the AMX tiles.
  On the 2-core development VM (2026-12-07, `bench/bench_precision.py`, bench/NOTES.md "bf16 on
  the CPU") they ran 6.0–7.8× the fp32 rate at the training step's shapes (1.9–2.4 TFLOP/s
  against 0.31–0.33), and the features-given training step took 2.49 s instead of 4.36.

A CPU with ``avx512_bf16`` but no AMX (Cooper Lake, Zen 4) multiplies bf16 with vector
instructions: whether that beats fp32 there is unmeasured, so it stays fp32. Inference
(`internalize`, `ask`, the engine) runs in the dtype the model was loaded in; the command line's
``--dtype auto`` (`v2l_fast.cli.common.auto_dtype`) asks this module which that is.

`training_autocast` is the context of a training forward: bf16 autocast, and on the CPU the
decoder's attention through PyTorch's math SDPA kernel, whose bf16 backward there is 3.6× faster
than the flash kernel's (11 vs 41 ms per layer at the training step's 32 rows × 9 heads × 88
tokens; the flash forward is faster, 3 vs 11 ms, but the pair is 22 vs 44 ms).

A models-level module: it imports only torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def bf16_matmul_hardware(device: torch.device | str) -> str | None:
    """What multiplies bf16 matrices in hardware on ``device`` (``"CUDA"``, ``"AMX"``), or None.

    None means bf16 would be emulated there (slower than fp32); `bf16_unavailable_reason` says why.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "CUDA" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return "AMX" if _cpu_has_amx() else None
    return None


def bf16_unavailable_reason(device: torch.device | str) -> str:
    """Why `bf16_matmul_hardware` is None on ``device`` (one line for ``v2l-fast info``)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "this CPU has no AMX tiles (bf16 would be emulated; avx512_bf16 alone is unmeasured)"
    if device.type == "cuda":
        return "this GPU does not support bf16 (before Ampere)"
    return f"no bf16 matmul check for device type {device.type!r}"


def _cpu_has_amx() -> bool:
    """AMX tiles usable by this process (the CPU has them and the OS lets the process use them)."""
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; torch ≥ 2.3
    return bool(is_supported and is_supported())


@contextlib.contextmanager
def training_autocast(device: torch.device | str, enabled: bool) -> Iterator[None]:
    """bf16 autocast over a training forward (nothing when not ``enabled``).

    On the CPU, where gradients are being recorded, the block's ``scaled_dot_product_attention``
    calls also take the math kernel (see the module docstring): the kernel chosen in the forward
    is the one the backward runs. Forward-only blocks (evaluation, teacher logits) keep the flash
    kernel, faster without a backward.
    """
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled))
        if enabled and device.type == "cpu" and torch.is_grad_enabled():
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield
