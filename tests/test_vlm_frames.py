"""Video inputs vs transformers' own SmolVLM code: pixels, prompt text, batching."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from v2l_fast.vlm.factory import smolvlm_config, tiny_smolvlm_tokenizer
from v2l_fast.vlm.frames import (
    IMAGE_TOKEN,
    VideoPreprocessor,
    build_video_batch,
    number_in_words,
    resized_size,
)
from v2l_fast.vlm.video import Video


def _frames(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("height, width, expected", [
    (32, 48, (256, 384)), (48, 32, (384, 256)), (100, 100, (384, 384)),
    (35, 64, (210, 384)),  # int(384·35/64) = 210
    (33, 64, (198, 384)),  # int(384·33/64) = 198
    (64, 37, (384, 222)),  # int(384·37/64) = 221 → odd, rounded up to 222
])
def test_resized_size_keeps_aspect_and_rounds_odd_side_up(height, width, expected):
    assert resized_size(height, width, 384) == expected


@pytest.mark.parametrize("size, max_image_size, longest_edge", [
    ((37, 64), 32, 384), ((64, 45), 48, 96), ((30, 30), 32, 384)])
def test_pixel_values_match_transformers_smolvlm_image_processor(size, max_image_size, longest_edge):
    """Same resize / rescale / normalise as SmolVLMImageProcessorPil with no image splitting."""
    SmolVLMImageProcessorPil = pytest.importorskip(  # a PIL backend of transformers ≥ 5.x
        "transformers.models.smolvlm.image_processing_pil_smolvlm").SmolVLMImageProcessorPil
    frames = _frames(3, *size)
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.27, 0.28)
    pre = VideoPreprocessor(max_image_size=max_image_size, image_seq_len=4, longest_edge=longest_edge,
                            image_mean=mean, image_std=std)
    ours = pre.pixel_values(Video.from_frames(frames))
    theirs = SmolVLMImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": max_image_size}, image_mean=list(mean), image_std=list(std),
    )([[f for f in frames]], return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, 3, max_image_size, max_image_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_video_prompt_matches_transformers_smolvlm_processor():
    """The frame text equals SmolVLMProcessor.replace_video_token's (needs num2words)."""
    pytest.importorskip("num2words")
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
    from transformers.video_utils import VideoMetadata

    pre = VideoPreprocessor(max_image_size=32, image_seq_len=5)
    indices, fps, total = [0, 37, 75, 112, 149], 2.5, 150  # a 60 s clip
    video = Video(_frames(5, 8, 8), tuple(i / fps for i in indices), total / fps)
    processor = SimpleNamespace(image_seq_len=5, image_token=IMAGE_TOKEN,
                                fake_image_token="<fake_token_around_image>", global_image_token="<global-img>")
    metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps, frames_indices=indices)
    inputs = {"pixel_values": torch.zeros(1, 5, 3, 32, 32), "video_metadata": [metadata]}
    assert pre.video_text(video) == SmolVLMProcessor.replace_video_token(processor, inputs, 0)


def test_video_prompt_layout_without_num2words():
    """The spec §2 layout written out by hand for a 2-frame, 75 s clip."""
    pre = VideoPreprocessor(max_image_size=32, image_seq_len=2)
    video = Video(_frames(2, 8, 8), (0.0, 61.5), 75.2)
    tokenizer = tiny_smolvlm_tokenizer()
    frame = "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    expected = ("<|im_start|>User: You are provided the following series of two frames from a 0:01:15 "
                f"[H:MM:SS] video.\n\nFrame from 00:00:{frame}\nFrame from 01:01:{frame}\n\n"
                "Describe it.<end_of_utterance>\n")
    assert pre.prompt(video, "Describe it.", tokenizer) == expected


def test_number_in_words_matches_num2words():
    num2words = pytest.importorskip("num2words").num2words
    for n in [*range(0, 1200), 1999, 2000, 2024, 12345, 100000, 999999]:
        assert number_in_words(n) == num2words(n), n
    with pytest.raises(ValueError, match="n:"):
        number_in_words(-1)


def test_preprocessor_reads_model_config_and_preprocessor_dict():
    config = smolvlm_config("500M")
    default = VideoPreprocessor.for_model(config)
    assert (default.max_image_size, default.image_seq_len) == (512, 64)
    assert (default.max_frames, default.longest_edge) == (12, 384)
    read = VideoPreprocessor.for_model(config, {
        "max_image_size": {"longest_edge": 384}, "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1],
        "resample": 3, "video_sampling": {"fps": 2, "max_frames": 64}}, max_frames=8)
    assert read.max_image_size == 384 and read.image_mean == (0.1, 0.2, 0.3) and read.resample == 3
    assert read.fps == 2.0 and read.max_frames == 8  # the call's max_frames wins (spec §2: 12)
    assert VideoPreprocessor.for_model(smolvlm_config("2.2B")).image_seq_len == 81
    hub_size = VideoPreprocessor.for_model(config, {"size": {"longest_edge": 2048}})
    assert hub_size.longest_edge == 384  # the authors' 384, whatever the hub's image size
    assert VideoPreprocessor.for_model(config, {"v2l_fast": {"longest_edge": 64}}).longest_edge == 64


def test_build_video_batch_pads_text_right_and_frames_with_zeros():
    tokenizer = tiny_smolvlm_tokenizer()
    pre = VideoPreprocessor(max_image_size=32, image_seq_len=4, longest_edge=64)
    short, long = Video.from_frames(_frames(1, 20, 30), fps=1), Video.from_frames(_frames(3, 20, 30, 1), fps=1)
    batch = build_video_batch([short, long], "Go.", tokenizer, pre)
    assert batch.pixel_values.shape == (2, 3, 3, 32, 32)
    assert batch.pixel_attention_mask.tolist() == [[[[True] * 32] * 32] + [[[False] * 32] * 32] * 2,
                                                   [[[True] * 32] * 32] * 3]
    assert bool((batch.pixel_values[0, 1:] == 0).all()) and not bool((batch.pixel_values[0, 0] == 0).all())
    lengths = batch.attention_mask.sum(1).tolist()
    assert lengths[0] < lengths[1] == batch.input_ids.shape[1]
    assert batch.attention_mask[0, :lengths[0]].all() and not batch.attention_mask[0, lengths[0]:].any()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (batch.input_ids == image_id).sum(1).tolist() == [4, 12]
    single = build_video_batch([short], "Go.", tokenizer, pre)
    assert torch.equal(single.input_ids[0], batch.input_ids[0, :lengths[0]])
    with pytest.raises(ValueError, match="videos"):
        build_video_batch([], "Go.", tokenizer, pre)
