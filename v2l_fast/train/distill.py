"""The teacher of spec §7's optional KL term: the frozen VLM with the video in its context.

Teacher row i is one user turn ``[video, prompt_i]`` followed by the assistant turn
``target_i``, rendered by the processor's video chat template (`render_video_chat`, the frames
and size of internalisation), right-padded; its labels mark the answer — the tokens after the
prompt templated *with* the generation prompt (`teacher_prompt`, what the offline teacher
answered) — and −100 over the prompt and padding, as the student's rows (`student_batch`).

`teacher_answer_logits` runs the raw VLM (no `v2l_fast.vlm.LoRAPatch` may be active) under ``no_grad`` and
returns its fp32 logits at the answer positions only (the LM head on those rows of the hidden
states). The vision tower and connector run once per video of the step: the rows of one video
(its questions) take the same ``<image>`` tokens, as `v2l_fast.train.toy_vlm.in_context_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from v2l_fast.errors import fail
from v2l_fast.train.chat_rows import template_ids
from v2l_fast.train.objective import AnswerLogits, answer_logits, right_pad_labelled
from v2l_fast.vlm.features import image_tokens, video_rows_hidden
from v2l_fast.vlm.frames import VideoPreprocessor, pad_frames, video_turn
from v2l_fast.vlm.lora_patch import is_patched
from v2l_fast.vlm.video import Video


@dataclass
class TeacherBatch:
    """Teacher rows ``[rows, T]`` (ids, mask, answer labels), the pixels of the step's videos
    ``[videos, F, 3, S, S]`` with their frame mask ``[videos, F, S, S]``, and each row's video."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    row_video: torch.Tensor  # [rows] int64

    def to(self, device) -> TeacherBatch:
        """The batch on ``device``."""
        return TeacherBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                       self.pixel_values, self.pixel_attention_mask,
                                                       self.row_video)))


def teacher_batch(tokenizer, preprocessor: VideoPreprocessor, videos: Sequence[Video], prompts: Sequence[str],
                  targets: Sequence[str], row_video: Sequence[int], *, pad_token_id: int,
                  pixels: Sequence[torch.Tensor | None] | None = None) -> TeacherBatch:
    """Spec §7's teacher rows (CPU tensors): row i is ``[videos[row_video[i]], prompts[i]]`` then
    the assistant turn ``targets[i]``, labelled on the answer.

    ``pixels[v]`` (``[F_v, 3, S, S]``, or None) are ``videos[v]``'s preprocessed frames when the
    caller already has them; the others are made by ``preprocessor``.
    """
    if len(prompts) != len(targets) or len(prompts) != len(row_video):
        fail("targets", f"one target and one video index per prompt ({len(prompts)} prompts)",
             f"{len(targets)} targets, {len(row_video)} video indices")
    if not prompts:
        fail("prompts", "at least one prompt", "none")
    if not videos or min(row_video) < 0 or max(row_video) >= len(videos):
        fail("row_video", f"indices into the {len(videos)} videos", list(row_video))
    video_texts = [preprocessor.video_text(video) for video in videos]
    rows, starts = [], []
    for i, (prompt, target, v) in enumerate(zip(prompts, targets, row_video)):
        turns = video_turn(prompt)
        prompt_only = template_ids(tokenizer, turns, video_texts[v], generation_prompt=True)
        full = template_ids(tokenizer, turns + [{"role": "assistant", "content": [{"type": "text", "text": target}]}],
                            video_texts[v], generation_prompt=False)
        if full[:len(prompt_only)] != prompt_only or len(full) == len(prompt_only):
            fail(f"targets[{i}]", "a non-empty answer that extends the templated teacher prompt", repr(target[:80]))
        rows.append(full)
        starts.append(len(prompt_only))
    given = list(pixels) if pixels is not None else [None] * len(videos)
    if len(given) != len(videos):
        fail("pixels", f"one entry per video ({len(videos)})", len(given))
    frames = [p if p is not None else preprocessor.pixel_values(video) for p, video in zip(given, videos)]
    pixel_values, pixel_mask = pad_frames(frames, preprocessor.max_image_size)
    return TeacherBatch(*right_pad_labelled(rows, starts, pad_token_id), pixel_values, pixel_mask,
                        torch.as_tensor(list(row_video), dtype=torch.long))


@torch.no_grad()
def teacher_answer_logits(model: torch.nn.Module, batch: TeacherBatch) -> AnswerLogits:
    """The raw VLM's fp32 logits at ``batch``'s answer positions (`answer_logits`), under no_grad.

    ``model`` is a ``SmolVLMForConditionalGeneration`` on its device; the vision tower and
    connector run once per video, row i's ``<image>`` positions take video ``row_video[i]``'s
    tokens, and the decoder runs on the rows (causal: padding on the right changes nothing
    before it). Refused while a `v2l_fast.vlm.LoRAPatch` is active: the teacher is the VLM without adapters.
    """
    if is_patched(model):
        fail("model", "the raw VLM for the teacher (no LoRAPatch active)", "a patched model")
    batch = batch.to(next(model.parameters()).device)
    hidden = video_rows_hidden(model, batch.input_ids, batch.attention_mask,
                               image_tokens(model, batch.pixel_values, batch.pixel_attention_mask), batch.row_video)
    return answer_logits(model, hidden, batch.labels)
