"""The Frames2LoRA hypernetwork: module, configuration, composition and checkpoint I/O.

``hn = load_frames2lora(path)`` then ``adapters = hn.generate(features, mask)`` gives one
``down_proj`` adapter per video (``adapters.A``, ``adapters.B``, ``adapters.alpha``).
"""

from v2l_fast.hypernet.checkpoint import (
    PickledRecord,
    UnsafeCheckpointError,
    infer_config,
    load_frames2lora,
    read_official_checkpoint,
    save_frames2lora,
)
from v2l_fast.hypernet.compose import combine_lora
from v2l_fast.hypernet.config import Frames2LoRAConfig
from v2l_fast.hypernet.model import Frames2LoRA, GeneratedAdapters

__all__ = [
    "Frames2LoRA",
    "Frames2LoRAConfig",
    "GeneratedAdapters",
    "PickledRecord",
    "UnsafeCheckpointError",
    "combine_lora",
    "infer_config",
    "load_frames2lora",
    "read_official_checkpoint",
    "save_frames2lora",
]
