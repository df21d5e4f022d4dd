"""Backend registry and selection for the public ops.

An op registers one implementation per backend it has, as a callable or a lazy
``"module:attr"`` path (so importing `v2l_fast.ops` never imports triton or the extension).

Backends:
    torch   the plain-PyTorch reference; runs anywhere.
    triton  Triton kernels; needs a CUDA GPU, or ``TRITON_INTERPRET=1`` for CPU tensors
            (the interpreter: for tests, never chosen by ``auto``).
    cuda    kernels in the compiled extension `v2l_fast._C` built with CUDA; CUDA tensors.
    cpp     C++ kernels in `v2l_fast._C` for CPU tensors.

``backend="auto"`` takes ``$V2L_BACKEND`` if set and the op has that backend, else the op's
preference list for the inputs' device (fastest first, from the benchmarks), skipping any
backend whose runtime is missing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from v2l_fast._ext import load_extension
from v2l_fast.kernels._common import interpreting

BACKENDS = ("torch", "triton", "cuda", "cpp")
ENV_VAR = "V2L_BACKEND"

_implementations: dict[str, dict[str, Callable | str]] = {}
_auto_order: dict[str, dict[str, tuple[str, ...]]] = {}


def register(op: str, backend: str, impl: Callable | str) -> None:
    """Register ``impl`` (callable or ``"module:attr"``) as ``op``'s ``backend`` implementation."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _implementations.setdefault(op, {})[backend] = impl


def set_auto_order(op: str, *, cuda: tuple[str, ...], cpu: tuple[str, ...]) -> None:
    """Set the order in which ``auto`` tries ``op``'s backends, per input device type."""
    _auto_order[op] = {"cuda": cuda, "cpu": cpu}


def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def runtime_missing(backend: str, device: torch.device | None = None) -> str | None:
    """Why ``backend`` cannot run (on ``device`` if given), or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_importable():
            return "the triton package is not installed"
        on_cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
        if on_cpu and not interpreting():
            return "triton needs CUDA tensors, or TRITON_INTERPRET=1 to interpret kernels on the CPU"
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return None
    ext = load_extension()
    if ext is None:
        return "the compiled extension v2l_fast._C is not built (pip install --no-build-isolation -e .)"
    if backend == "cuda":
        if not ext.build_info()["cuda"]:
            return "v2l_fast._C was built without CUDA (needs a CUDA torch and nvcc at build time)"
        if device is not None and device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        if device is None and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if device is not None and device.type != "cpu":
        return f"the cpp backend needs CPU tensors, got {device.type}"
    return None


def available_backends(op: str | None = None) -> list[str]:
    """Backends that can run here: implemented (by ``op``, or by any op) and with a runtime."""
    ops = [op] if op is not None else list(_implementations)
    implemented = {b for name in ops for b in _implementations.get(name, {})}
    return [b for b in BACKENDS if b in implemented and runtime_missing(b) is None]


def _load(op: str, backend: str) -> Callable:
    impl = _implementations[op][backend]
    if isinstance(impl, str):
        module, attr = impl.split(":")
        impl = getattr(importlib.import_module(module), attr)
        _implementations[op][backend] = impl
    return impl


def resolve(op: str, backend: str, device: torch.device | torch.Tensor | object) -> Callable:
    """The implementation of ``op`` for ``backend`` and inputs on ``device``.

    ``device`` may also be the op's first input: its device is used (the CPU for a non-tensor,
    which the implementation's own argument check then rejects with a clear message).

    Raises ValueError for an unknown backend name and RuntimeError naming what is missing
    when the requested backend cannot run.
    """
    if not isinstance(device, torch.device):
        device = device.device if isinstance(device, torch.Tensor) else torch.device("cpu")
    impls = _implementations[op]
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"${ENV_VAR}: expected one of {('auto', *BACKENDS)}, got {env!r}")
            if env in impls:
                backend = env
        if backend == "auto":
            order = _auto_order.get(op, {}).get("cuda" if device.type == "cuda" else "cpu", ("torch",))
            for name in order:
                if name in impls and runtime_missing(name, device) is None and not (
                        name == "triton" and device.type == "cpu"):
                    return _load(op, name)
            return _load(op, "torch")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in impls:
        have = ", ".join(sorted(impls))
        raise RuntimeError(f"{op} has no {backend!r} backend (it has: {have})")
    missing = runtime_missing(backend, device)
    if missing:
        raise RuntimeError(f"{op}: backend {backend!r} cannot run: {missing}")
    return _load(op, backend)
