"""Argument checks shared by the reference ops, the dispatching ops and the kernels.

Every failure is a ``ValueError`` whose message names the argument and what was expected, so
a caller never sees a stack trace from deep inside a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


def fail(name: str, expected: str, got: object) -> NoReturn:
    """Raise the project's uniform ValueError for argument ``name``."""
    raise ValueError(f"{name}: expected {expected}, got {got}")


def check_int(name: str, value: object, minimum: int, note: str = "") -> None:
    """Refuse ``value`` unless it is an int (not a bool) >= ``minimum``: ``name: expected an int >=
    minimum (note), got value``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(name, f"an int >= {minimum}" + (f" ({note})" if note else ""), repr(value))


def describe(t: torch.Tensor) -> str:
    """Short description of a tensor for error messages."""
    return f"tensor of shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    floating: bool = False,
    index: bool = False,
    device: torch.device | None = None,
    shape_hint: str = "",
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank / dtype kind / device; return it."""
    hint = f" {shape_hint}" if shape_hint else ""
    if not isinstance(t, torch.Tensor):
        fail(name, f"a torch.Tensor{hint}", type(t).__name__)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            ranks = " or ".join(f"{d}-D" for d in allowed)
            fail(name, f"a {ranks} tensor{hint}", describe(t))
    if floating and not t.is_floating_point():
        fail(name, f"a floating-point tensor{hint}", describe(t))
    if index and t.dtype not in _INDEX_DTYPES:
        fail(name, f"an int32 or int64 tensor{hint}", describe(t))
    if device is not None and t.device != device:
        fail(name, f"a tensor on {device} (the device of the other inputs){hint}", describe(t))
    return t


def check_dim(name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    """Check ``t.shape[dim] == size``; ``what`` names the size (e.g. "I, the width of x")."""
    if t.shape[dim] != size:
        fail(name, f"size {size} ({what}) in dim {dim}", describe(t))
