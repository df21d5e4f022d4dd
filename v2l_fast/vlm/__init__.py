"""SmolVLM2 integration: loading, video input, feature extraction and the LoRA patch.

`load_smolvlm` gives a `VLM` (model, tokenizer, `VideoPreprocessor`); `read_video` /
`Video.from_frames` and `build_video_batch` make its video inputs without torchvision;
`extract_features` gives the hypernetwork's stacked layer states; `LoRAPatch` applies a batch
of adapters to any decoder's Linear modules through `v2l_fast.ops.lora_sgmv`.
`v2l_fast.vlm.factory` (not imported here) builds tiny or full-size random SmolVLM2 models
in-process, for the demo, the benchmarks and the tests.
"""

from v2l_fast.vlm.features import extract_features
from v2l_fast.vlm.frames import DEFAULT_INSTRUCTION, VideoBatch, VideoPreprocessor, build_video_batch
from v2l_fast.vlm.load import VLM, load_smolvlm
from v2l_fast.vlm.lora_patch import LoRAPatch, decoder_layers, down_proj_targets, is_patched
from v2l_fast.vlm.video import Video, VideoError, read_video, sample_frame_indices, write_video

__all__ = [
    "DEFAULT_INSTRUCTION",
    "VLM",
    "LoRAPatch",
    "Video",
    "VideoBatch",
    "VideoError",
    "VideoPreprocessor",
    "build_video_batch",
    "decoder_layers",
    "down_proj_targets",
    "extract_features",
    "is_patched",
    "load_smolvlm",
    "read_video",
    "sample_frame_indices",
    "write_video",
]
