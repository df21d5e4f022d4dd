"""Test helpers: relative-error tolerances of the design card, random test videos, small hypernetworks.

Models for tests come from `v2l_fast.vlm.factory` (tiny random SmolVLM2 models, released
shapes); nothing in the package imports this module.
"""

from __future__ import annotations

import torch

# ‖out − ref‖ / ‖ref‖ bounds of the design card's testing conventions.
REL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; ``inf`` if ``out`` holds a NaN/Inf or the shapes differ."""
    if out.shape != ref.shape or not bool(torch.isfinite(out).all()):
        return float("inf")
    out64, ref64 = out.double(), ref.double()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff if denom == 0.0 else diff / denom


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                     tol: float | None = None) -> None:
    """Assert ``rel_error(out, ref)`` is within the tolerance for ``dtype`` (default: out's)."""
    bound = tol if tol is not None else REL_TOLERANCE[dtype or out.dtype]
    err = rel_error(out, ref)
    assert err <= bound, f"relative error {err:.3e} > {bound:.1e} (shape {list(out.shape)})"


def write_test_video(path, num_frames: int = 6, fps: int = 4, size: tuple[int, int] = (32, 48),
                     codec: str = "mpeg4", seed: int = 0):
    """Encode ``num_frames`` random RGB frames (H, W = ``size``) at ``fps`` into ``path`` with
    PyAV (yuv420p); return the frames ``[F, H, W, 3]`` uint8 that went in."""
    import numpy as np

    from v2l_fast.vlm.video import write_video

    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, *size, 3), dtype=np.uint8)
    write_video(path, frames, fps=fps, codec=codec)
    return frames


def tiny_hypernet(model: torch.nn.Module, seed: int = 0):
    """A small random `Frames2LoRA` for ``model`` (rank 4, D = 32, 6 queries, 1 block) whose
    zero-initialised B parts (scaler_B and bias_B start at 0, spec §4) are perturbed, so that
    its adapters are not zero."""
    from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig

    torch.manual_seed(seed)
    hypernet = Frames2LoRA(Frames2LoRAConfig.for_vlm(model.config, rank=4, latent_size=32, num_latent_queries=6,
                                                     num_blocks=1))
    with torch.no_grad():
        hypernet.scaler_B["down_proj"].normal_(0, 0.5)
        hypernet.bias_B["down_proj"].normal_(0, 0.05)
    return hypernet
