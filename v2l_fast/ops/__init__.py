"""Public ops of v2l_fast with backend dispatch.

Each op is generated from its reference twin in `v2l_fast.reference` (same signature, plus
``check=`` and ``backend=``; see `v2l_fast.ops.registry`). The backend is chosen by
``backend=``, else `use_backend` (scoped), else ``$V2L_BACKEND``, else automatically;
`available_backends()` lists the backends that can run on this machine.
"""

from v2l_fast.ops.compose_adapters import compose_adapters
from v2l_fast.ops.lora_sgmv import LoraSgmvMetadata, lora_sgmv, lora_sgmv_metadata
from v2l_fast.ops.perceiver_attention import perceiver_attention
from v2l_fast.ops.registry import Resolved, available_backends, current_backend, resolve, use_backend
from v2l_fast.ops.swiglu_mlp import swiglu_mlp

__all__ = [
    "LoraSgmvMetadata", "Resolved", "available_backends", "compose_adapters", "current_backend", "lora_sgmv",
    "lora_sgmv_metadata", "perceiver_attention", "resolve", "swiglu_mlp", "use_backend",
]
