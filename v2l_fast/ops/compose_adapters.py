"""`compose_adapters` with backend dispatch (see v2l_fast.reference.compose_adapters).

Not a torch.library op: its inputs are sequences of factors and its output rank depends on
them, and nothing compiles around it (it runs once per composed adapter, not per token).
"""

from __future__ import annotations

from v2l_fast.ops import checks
from v2l_fast.ops.registry import define_op, positional
from v2l_fast.reference.compose_adapters import compose_adapters as reference

compose_adapters = define_op(
    reference, check=checks.compose_adapters, device_of=lambda a: a.As[0].device,
    auto={"cuda": ("torch",), "cpu": ("torch",)})
compose_adapters.op.register("torch", positional(reference))
