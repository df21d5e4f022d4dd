"""Access to the compiled extension `v2l_fast._C`, which is optional at import time."""

from __future__ import annotations

import importlib
from types import ModuleType

_MISSING_HINT = (
    "v2l_fast._C is not built. Build it with `pip install --no-build-isolation -e .` "
    "(needs cmake, ninja and a C++ compiler; CUDA kernels also need nvcc and a CUDA torch). "
    "Until then the torch and triton backends work without it."
)


def load_extension() -> ModuleType | None:
    """Return the compiled `v2l_fast._C` module, or None when it is not built."""
    try:
        return importlib.import_module("v2l_fast._C")
    except ImportError:
        return None


def require_extension() -> ModuleType:
    """Return `v2l_fast._C`, raising ImportError with build instructions when it is missing."""
    ext = load_extension()
    if ext is None:
        raise ImportError(_MISSING_HINT)
    return ext


def build_info() -> dict:
    """What the compiled extension was built with, or ``{"built": False, "hint": ...}``."""
    ext = load_extension()
    if ext is None:
        return {"built": False, "hint": _MISSING_HINT}
    return {"built": True, **ext.build_info()}
