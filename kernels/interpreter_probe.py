"""Can this triton's interpreter run the kernels here (``TRITON_INTERPRET=1``, CPU tensors)?

Every kernel of the package loops over a bound known only at run time (``range(n)`` of a kernel
argument, or of a value loaded in the kernel). Found with triton 3.6.0 and numpy 2.4.6: triton
3.6's interpreter turns such a bound into a Python int with ``int(array)`` on a one-element
array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
scalars"), so every kernel fails on its first loop; triton 3.7 squeezes the array first. A
compiled kernel on a GPU does not take this path. `interpreter_defect` runs a one-loop kernel
once and says why the interpreter cannot run, so that `v2l_fast.ops` reports the triton backend
as unavailable on the CPU (``v2l-fast info``, skips in the tests) instead of failing inside it.

Imports triton: `v2l_fast.ops.registry` imports this module only when it interprets.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _count_kernel(out_ptr, n):
    total = 0
    for _ in range(n):
        total += 1
    tl.store(out_ptr, total)


@functools.cache
def interpreter_defect() -> str | None:
    """Why the Triton interpreter cannot run a loop over a kernel argument here, or None when it can."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_kernel[(1,)](out, 3)
    except Exception as exc:  # any failure means the same to the caller: the kernels cannot run here
        cause = exc.__cause__ or exc  # the interpreter wraps the kernel's own error
        first_line = str(cause).splitlines()[0] if str(cause) else ""
        if isinstance(cause, TypeError) and "0-dimensional" in first_line:  # the triton 3.6 + numpy 2.4 defect
            return (f"triton {triton.__version__}'s interpreter cannot run a loop over a kernel argument with "
                    f"numpy {np.__version__} ({type(cause).__name__}: {first_line}); triton>=3.7 can")
        # e.g. TRITON_INTERPRET set only after triton was imported: the kernels were compiled for a GPU
        return (f"triton {triton.__version__} could not interpret a one-loop kernel "
                f"({type(cause).__name__}: {first_line})")
    if int(out) != 3:
        return f"triton {triton.__version__}'s interpreter counted {int(out)} iterations of a 3-iteration loop"
    return None
