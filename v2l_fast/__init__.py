"""v2l_fast: fused kernels and a serving stack for video-to-LoRA internalization.

A video is read once by a frozen SmolVLM2; a Perceiver hypernetwork (Frames2LoRA) turns its
layer-wise hidden states into a LoRA adapter for the decoder's ``down_proj``; later questions
are answered by the same frozen model with that adapter and zero visual tokens in context.

Subpackages: `v2l_fast.ops` (public ops with backend dispatch), `v2l_fast.reference`
(plain-PyTorch ground truth), `v2l_fast.kernels` (Triton kernels). The compiled extension
`v2l_fast._C` is optional: `v2l_fast.build_info()` says whether and how it was built.

The stack: `v2l_fast.load` (a `Session` of VLM + hypernetwork), `v2l_fast.internalize`,
`v2l_fast.ask` and `v2l_fast.Adapters` (save / load with the base model's fingerprint);
`v2l_fast.vlm` holds the SmolVLM2 integration. They are imported on first use, so that
`import v2l_fast` stays light for kernel users.
"""

import sys
from pathlib import Path


def _leave_sys_path_if_checkout_root() -> None:
    """Drop this source checkout's root from ``sys.path``.

    ``python -m …``, ``python -c`` and notebooks started in the checkout's root put it first on
    ``sys.path``, where the Triton sources' directory ``kernels/`` (installed as
    `v2l_fast.kernels`) shadows the PyPI package ``kernels`` that transformers 5.25+ imports; the
    root leaves ``sys.path`` when `v2l_fast` is imported (so: import it before transformers).
    Only a checkout's root (``setup.py`` beside our ``kernels/``) is removed, never an installed
    copy's parent (site-packages). `v2l_fast`'s own submodules resolve through the package.
    """
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "kernels" / "lora_sgmv.py").is_file():
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]


_leave_sys_path_if_checkout_root()

from v2l_fast._ext import build_info  # noqa: E402  (after the sys.path fix above)

__version__ = "0.1.0"

_LAZY = {"Adapters": "v2l_fast.adapters", "Session": "v2l_fast.api", "ask": "v2l_fast.api",
         "internalize": "v2l_fast.api", "load": "v2l_fast.api", "load_smolvlm": "v2l_fast.vlm.load"}

__all__ = ["__version__", "build_info", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'v2l_fast' has no attribute {name!r}")
