"""`swiglu_mlp` with backend dispatch (see v2l_fast.reference.swiglu_mlp).

Kernel arguments: the reference's, ``x, gate_weight, up_weight, down_weight``. Backends:
"torch" (gate and up as one GEMM, `kernels/swiglu_mlp_torch.py`) and "triton" (the same GEMM
with a silu·mul epilogue); the reference runs three linears.
"""

from __future__ import annotations

import functools

import torch

from v2l_fast.ops import checks
from v2l_fast.ops.registry import define_op, kernel_schema
from v2l_fast.reference.swiglu_mlp import swiglu_mlp as reference


def _output_like(x, gate_weight, up_weight, down_weight):
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in (x, gate_weight, up_weight, down_weight)))
    return x.new_empty(*x.shape[:-1], down_weight.shape[0], dtype=dtype)


swiglu_mlp = define_op(
    reference, check=checks.swiglu_mlp, device_of=lambda a: a.x.device,
    schema=kernel_schema(reference), fake=_output_like,
    auto={"cuda": ("triton", "torch"), "cpu": ("torch",)})
swiglu_mlp.op.register("torch", "v2l_fast.kernels.swiglu_mlp_torch:swiglu_mlp")
swiglu_mlp.op.register("triton", "v2l_fast.kernels.swiglu_mlp:swiglu_mlp")
