"""CPU training with denormal floats flushed to zero.

As a network trains, some of its fp32 activations and gradients fall below the smallest normal
float (1.2e-38: attention weights of keys that lose by far, products of such weights); x86 cores
handle those denormals in microcode, tens of times slower than normal floats. Measured on the toy
replication's hypernetwork (2 cores): a step took 0.19 s at initialisation and 0.41 s with the
trained weights of its last step; with denormals flushed, 0.21 s (bench/NOTES.md, "Denormals").
`flush_denormals` turns the cores' flush-to-zero / denormals-are-zero modes on for a block
(``torch.set_flush_denormal``) and restores the previous mode after. Values below 1.2e-38 become
0: the loss and the gradients change below fp32's resolution of any normal value they are added
to. It is a no-op where the CPU has no such mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def denormals_flushed() -> bool:
    """Whether CPU float math flushes denormals to zero now."""
    return torch.tensor([1e-40]).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormals to zero in CPU float math inside the block (module docstring)."""
    before = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
