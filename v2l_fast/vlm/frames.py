"""SmolVLM2's video inputs without its processor: pixel tensors and the frame prompt.

SmolVLM2's own video processor needs torchvision (no CPU build here) and ``num2words``; this
module reproduces what it produces for a video (docs/method.md §2) with PIL and numpy:

* pixels: resize keeping the aspect ratio so the longest edge is ``longest_edge`` (an odd short
  side rounded up to even), stretch to the ``max_image_size`` square, both LANCZOS on uint8;
  rescale by 1/255 and normalise with the processor's mean and std. Verified against
  transformers' ``SmolVLMImageProcessorPil`` with ``do_image_splitting=False`` (tests).
* text: the intro sentence with the frame count in words and the ``H:MM:SS`` duration, one
  ``Frame from MM:SS:`` line plus ``<fake_token_around_image><global-img>`` +
  ``<image>``×image_seq_len + ``<fake_token_around_image>`` per frame, two newlines; rendered
  in the processor's video chat template. Verified against ``SmolVLMProcessor.
  replace_video_token`` when ``num2words`` is installed (tests).

Batches are right-padded (text) and frame-padded with all-zero frames, which SmolVLM2's vision
path drops; right padding keeps every real token's position, so a batch equals its videos run
one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
from PIL import Image
from transformers.models.smolvlm.processing_smolvlm import (
    DEFAULT_CHAT_TEMPLATE as SMOLVLM_VIDEO_CHAT_TEMPLATE,
)

from v2l_fast.errors import fail
from v2l_fast.vlm.video import Video

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
IMAGE_TOKEN = "<image>"
VIDEO_PLACEHOLDER = "<video>"

VIDEO_INTRO = "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
FRAME_LINE = "\nFrame from {minutes:02d}:{seconds:02d}:"
VIDEO_OUTRO = "\n\n"

# The processor's template for conversations with a video; the tokenizer's own template is
# used for text-only questions.
VIDEO_CHAT_TEMPLATE = SMOLVLM_VIDEO_CHAT_TEMPLATE

DEFAULT_INSTRUCTION = "Internalize this video for later captioning."


@dataclass(frozen=True)
class VideoPreprocessor:
    """Frame sampling and pixel settings of one SmolVLM2 (its ``preprocessor_config.json``).

    Defaults are the Frames2LoRA inference preset (spec §2): 12 frames, longest edge 384.
    ``max_image_size`` is the square side the vision encoder takes (384 for 2.2B, 512 for
    256M/500M), ``image_seq_len`` the ``<image>`` tokens per frame.
    """

    max_image_size: int
    image_seq_len: int
    longest_edge: int = 384
    max_frames: int = 12
    fps: float = 1.0
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = field(default=int(Image.Resampling.LANCZOS))

    @classmethod
    def for_model(cls, config, processor_dict: dict | None = None, **overrides) -> VideoPreprocessor:
        """Settings for a model ``config`` (a SmolVLMConfig), read from a preprocessor dict.

        ``processor_dict`` is the content of ``preprocessor_config.json`` (None: the
        transformers defaults, 0.5 mean/std, and ``max_image_size`` = the vision tower's
        ``image_size``); ``longest_edge`` is 384 (the authors' setting) unless the dict's
        ``"v2l_fast": {"longest_edge": N}`` says otherwise. ``overrides`` replace fields (e.g. ``max_frames=8``).
        """
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        values: dict = dict(max_image_size=vision.image_size,
                            image_seq_len=side * side // config.scale_factor ** 2)
        if processor_dict:
            if "max_image_size" in processor_dict:
                values["max_image_size"] = int(processor_dict["max_image_size"]["longest_edge"])
            for key in ("image_mean", "image_std"):
                if key in processor_dict:
                    values[key] = tuple(float(v) for v in processor_dict[key])
            for key, cast in (("rescale_factor", float), ("resample", int)):
                if key in processor_dict:
                    values[key] = cast(processor_dict[key])
            # The authors resize to 384 whatever the hub config says (docs/method.md §2); a model
            # v2l_fast writes (the toy VLM at 64 px) names its own first resize here.
            if "longest_edge" in (processor_dict.get("v2l_fast") or {}):
                values["longest_edge"] = int(processor_dict["v2l_fast"]["longest_edge"])
            if "fps" in (processor_dict.get("video_sampling") or {}):
                values["fps"] = float(processor_dict["video_sampling"]["fps"])
        values.update(overrides)
        return cls(**values)

    def pixel_values(self, video: Video) -> torch.Tensor:
        """``[F, 3, S, S]`` float32 pixels of ``video``'s frames, S = ``max_image_size``."""
        return torch.from_numpy(np.stack([self._frame_pixels(frame) for frame in video.frames]))

    def _frame_pixels(self, frame: np.ndarray) -> np.ndarray:
        height, width = resized_size(frame.shape[0], frame.shape[1], self.longest_edge)
        image = Image.fromarray(frame).resize((width, height), resample=self.resample)
        image = image.resize((self.max_image_size, self.max_image_size), resample=self.resample)
        pixels = (np.asarray(image).astype(np.float64) * self.rescale_factor).astype(np.float32)
        pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def video_text(self, video: Video) -> str:
        """The text that stands for ``video`` in the prompt (frame tokens and timestamps)."""
        frame_tokens = FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * self.image_seq_len + FAKE_IMAGE_TOKEN
        text = VIDEO_INTRO.format(count=number_in_words(len(video.frames)),
                                  duration=str(timedelta(seconds=int(video.duration))))
        for second in video.timestamps:
            text += FRAME_LINE.format(minutes=int(second // 60), seconds=int(second % 60)) + frame_tokens
        return text + VIDEO_OUTRO

    def prompt(self, video: Video, instruction: str, tokenizer) -> str:
        """The full context string: one user turn ``[video, instruction]``, no generation prompt."""
        return render_video_chat(tokenizer, video_turn(instruction), self.video_text(video), generation_prompt=False)


def video_turn(text: str) -> list[dict]:
    """The conversation of one user turn ``[video, text]``."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


def render_video_chat(tokenizer, turns: list[dict], video_text: str, *, generation_prompt: bool) -> str:
    """``turns`` rendered by the video chat template, the video placeholder replaced by ``video_text``
    (`VideoPreprocessor.video_text`)."""
    rendered = tokenizer.apply_chat_template(turns, chat_template=VIDEO_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    return rendered.replace(VIDEO_PLACEHOLDER, video_text, 1)


def resized_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) with the longest edge at ``longest_edge``, aspect kept, short side even."""
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_in_words(n: int) -> str:
    """English cardinal of ``0 ≤ n < 10⁶`` as ``num2words`` writes it ("twenty-one", "one
    hundred and five"), for the video intro sentence."""
    if not 0 <= n < 1_000_000:
        fail("n", "0 <= n < 1000000", n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" and " + number_in_words(rest) if rest else "")
    thousands, rest = divmod(n, 1000)
    head = number_in_words(thousands) + " thousand"
    if not rest:
        return head
    return head + (" and " if rest < 100 else ", ") + number_in_words(rest)


@dataclass
class VideoBatch:
    """Model inputs for a batch of videos: right-padded ids, frame-padded pixels."""

    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] int64, 1 = real token
    pixel_values: torch.Tensor  # [B, F, 3, side, side] float32
    pixel_attention_mask: torch.Tensor  # [B, F, side, side] bool, False for padding frames

    def to(self, device, dtype: torch.dtype | None = None) -> VideoBatch:
        """The batch on ``device``, pixels cast to ``dtype`` if given."""
        return VideoBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.pixel_values.to(device=device, dtype=dtype or self.pixel_values.dtype),
                          self.pixel_attention_mask.to(device))


def pad_frames(pixels: list[torch.Tensor], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-video ``[F_i, 3, side, side]`` pixels into ``[B, F, 3, side, side]``, F = max F_i,
    zero-padded, with the ``[B, F, side, side]`` bool mask that is False on padding frames."""
    frames = max(p.shape[0] for p in pixels)
    pixel_values = torch.zeros(len(pixels), frames, 3, side, side)
    pixel_mask = torch.zeros(len(pixels), frames, side, side, dtype=torch.bool)
    for b, pix in enumerate(pixels):
        pixel_values[b, :pix.shape[0]] = pix
        pixel_mask[b, :pix.shape[0]] = True
    return pixel_values, pixel_mask


def build_video_batch(videos: list[Video], instruction: str, tokenizer, preprocessor: VideoPreprocessor,
                      pad_token_id: int = 0) -> VideoBatch:
    """Tokenize each video's prompt and stack the pixels into one `VideoBatch`."""
    if not videos:
        fail("videos", "at least one video", "an empty list")
    ids = [tokenizer(preprocessor.prompt(video, instruction, tokenizer), add_special_tokens=False)["input_ids"]
           for video in videos]
    pixel_values, pixel_mask = pad_frames([preprocessor.pixel_values(video) for video in videos],
                                          preprocessor.max_image_size)
    batch, seq = len(videos), max(map(len, ids))
    input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, row in enumerate(ids):
        input_ids[b, :len(row)] = torch.tensor(row)
        attention_mask[b, :len(row)] = 1
    return VideoBatch(input_ids, attention_mask, pixel_values, pixel_mask)
