"""`perceiver_attention` with backend dispatch (see v2l_fast.reference.perceiver_attention).

Kernel arguments: the reference's, in order (``latents, context, context_mask, q_weight, …,
num_heads, num_kv_heads, eps, context_normalized``), validated once by `v2l_fast.ops.checks`.
Backends: "torch" (K/V absorbed into the queries, `kernels/perceiver_attention_torch.py`) and
"triton" (the same algebra with a flash-decoding kernel over the context); the reference
materialises K/V.
"""

from __future__ import annotations

import functools

import torch

from v2l_fast.ops import checks
from v2l_fast.ops.registry import define_op, kernel_schema
from v2l_fast.reference.perceiver_attention import perceiver_attention as reference


def _output_like(latents, context, context_mask, *weights_and_sizes):
    floats = [latents, context, *(t for t in weights_and_sizes if isinstance(t, torch.Tensor))]
    return latents.new_empty(latents.shape, dtype=functools.reduce(torch.promote_types, (t.dtype for t in floats)))


perceiver_attention = define_op(
    reference, check=checks.perceiver_attention, device_of=lambda a: a.latents.device,
    schema=kernel_schema(reference), fake=_output_like,
    auto={"cuda": ("triton", "torch"), "cpu": ("torch",)})
perceiver_attention.op.register("torch", "v2l_fast.kernels.perceiver_attention_torch:perceiver_attention")
perceiver_attention.op.register("triton", "v2l_fast.kernels.perceiver_attention:perceiver_attention")
