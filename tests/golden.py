"""Where the authors' golden fixtures live: ``$V2L_FIXTURES``, else ``shared/fixtures`` beside
the checkout. Tests that need them are marked `needs_fixtures`: skipped with a reason on a
developer machine without them, but never under CI (``$CI`` set), where a missing fixture must
fail rather than pass silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(os.environ.get("V2L_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures")
GOLDEN = FIXTURES / "frames2lora_tiny.safetensors"
OFFICIAL_CKPT = FIXTURES / "frames2lora_tiny_ckpt.pt"
TINY_VLM = FIXTURES / "frames2lora_tiny_vlm"

needs_fixtures = pytest.mark.skipif(
    not (GOLDEN.is_file() and OFFICIAL_CKPT.is_file() and TINY_VLM.is_dir()) and not os.environ.get("CI"),
    reason=f"golden fixtures not found under {FIXTURES} (set V2L_FIXTURES)")


def golden_tensors() -> dict:
    """All tensors of the golden fixture file (skips the calling test like `needs_fixtures`)."""
    from safetensors.torch import load_file

    if not GOLDEN.is_file() and not os.environ.get("CI"):
        pytest.skip(f"golden fixtures not found under {FIXTURES} (set V2L_FIXTURES)")
    return load_file(GOLDEN)
