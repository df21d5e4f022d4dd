"""v2l_fast: fused kernels and a serving stack for video-to-LoRA internalization.

A video is read once by a frozen SmolVLM2; a Perceiver hypernetwork (Frames2LoRA) turns its
layer-wise hidden states into a LoRA adapter for the decoder's ``down_proj``; later questions
are answered by the same frozen model with that adapter and zero visual tokens in context.

Subpackages: `v2l_fast.ops` (public ops with backend dispatch), `v2l_fast.reference`
(plain-PyTorch ground truth), `v2l_fast.kernels` (Triton kernels). The compiled extension
`v2l_fast._C` is optional: `v2l_fast.build_info()` says whether and how it was built.
"""

from v2l_fast._ext import build_info

__version__ = "0.1.0"
__all__ = ["__version__", "build_info"]
