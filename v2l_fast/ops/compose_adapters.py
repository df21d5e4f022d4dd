"""`compose_adapters` with backend dispatch (see v2l_fast.reference.compose_adapters).

Not a torch.library op: its inputs are sequences of factors and its output rank depends on
them, and nothing compiles around it (it runs once per composed adapter, not per token).

Backends: ``torch`` (the reference: ``torch.cat``, then thin QRs and an SVD of the core) and
``triton`` (`v2l_fast.kernels.compose_adapters`: one fused pass that weights, concatenates and
accumulates the R × R Grams, then eigh/SVD of R × R matrices). ``auto`` chooses torch on both
devices until a GPU benchmark (bench/bench_compose_adapters.py) shows the kernel winning; it
never chooses the interpreter on the CPU.
"""

from __future__ import annotations

from v2l_fast.ops import checks
from v2l_fast.ops.registry import define_op, positional
from v2l_fast.reference.compose_adapters import compose_adapters as reference

compose_adapters = define_op(
    reference, check=checks.compose_adapters, device_of=lambda a: a.As[0].device,
    auto={"cuda": ("torch",), "cpu": ("torch",)})
compose_adapters.op.register("torch", positional(reference))
compose_adapters.op.register("triton", "v2l_fast.kernels.compose_adapters:compose_adapters")
