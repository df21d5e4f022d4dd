"""Public ops of v2l_fast with backend dispatch (``backend=`` or ``$V2L_BACKEND``).

Each op has a twin with the same signature in `v2l_fast.reference`; `available_backends()`
lists the backends that can run on this machine.
"""

from v2l_fast.ops.backends import available_backends
from v2l_fast.ops.compose_adapters import compose_adapters
from v2l_fast.ops.lora_sgmv import lora_sgmv, lora_sgmv_metadata
from v2l_fast.ops.perceiver_attention import perceiver_attention
from v2l_fast.ops.swiglu_mlp import swiglu_mlp

__all__ = [
    "available_backends", "compose_adapters", "lora_sgmv", "lora_sgmv_metadata", "perceiver_attention",
    "swiglu_mlp",
]
