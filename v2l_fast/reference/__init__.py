"""Plain-PyTorch ground truth of every v2l_fast op.

Each function here has a twin in `v2l_fast.ops` with the same signature and semantics; the
kernels are tested against these. They favour clarity over speed, validate their inputs and
support autograd.
"""

from v2l_fast.reference.compose_adapters import compose_adapters
from v2l_fast.reference.lora_sgmv import lora_sgmv
from v2l_fast.reference.perceiver_attention import perceiver_attention, rms_norm
from v2l_fast.reference.swiglu_mlp import swiglu_mlp

__all__ = ["compose_adapters", "lora_sgmv", "perceiver_attention", "rms_norm", "swiglu_mlp"]
