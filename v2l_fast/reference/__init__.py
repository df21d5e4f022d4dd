"""Plain-PyTorch ground truth of every v2l_fast op.

Each function here defines its op: `v2l_fast.ops` generates the public op from it (same
signature and semantics, plus ``check=`` and ``backend=``), and the kernels are tested against
it. They favour clarity over speed and support autograd; they assume valid arguments (the
public op validates them once, in `v2l_fast.ops.checks`).
"""

from v2l_fast.reference.compose_adapters import compose_adapters
from v2l_fast.reference.lora_sgmv import lora_sgmv
from v2l_fast.reference.perceiver_attention import perceiver_attention, rms_norm, rms_normalize
from v2l_fast.reference.swiglu_mlp import swiglu_mlp

__all__ = ["compose_adapters", "lora_sgmv", "perceiver_attention", "rms_norm", "rms_normalize", "swiglu_mlp"]
