"""Teacher answers with the video in context: the vision tower once per video vs once per row
(`pytest bench/bench_teacher.py --benchmark`).

`v2l-fast teacher` answers several questions per video (the training issue's 4 per step; the
authors' FineVideo manifests hold several per clip). Providers, interleaved round by round
(`harness.interleaved`), each answering every question of every video in one batch, greedy:

- ``v2l_fast``: `v2l_fast.train.teacher.video_answers` — each video's pixels through the vision
  tower and connector once, its ``<image>`` tokens shared by its rows as input embeddings;
- ``per_row_pixels``: the model's own way, as the authors' teacher script and v2l_fast before
  2026-12-07 ran it: every row's pixels (its video's frames repeated per row) passed to
  ``generate``, so the tower runs once per row.

The answers of both are compared before timing (equal, or the row records the mismatch count).
Model: SmolVLM2-256M shapes with random weights (`random_smolvlm`), the stand-in tokenizer of
`bench_e2e_ttft`, random 360×640 frames at 512 px (64 tokens per frame). CPU: 2 videos × 4
questions × 4 frames, fp32, 8 new tokens; GPU: 8 videos × 4 questions × 12 frames, bf16.
"""

from __future__ import annotations

import functools

import pytest
import torch
from bench_e2e_ttft import bench_tokenizer, synthetic_video

from v2l_fast.api import greedy_answers, left_pad, pad_id
from v2l_fast.train.teacher import teacher_prompt, video_answers
from v2l_fast.vlm.factory import random_smolvlm
from v2l_fast.vlm.frames import VideoPreprocessor, pad_frames
from v2l_fast.vlm.load import VLM

import harness

ON_GPU = torch.cuda.is_available()
DEVICE = harness.device()
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
VIDEOS, QUESTIONS, FRAMES = (8, 4, 12) if ON_GPU else (2, 4, 4)
MAX_NEW_TOKENS = 8
ROUNDS = 3 if ON_GPU else 2


@functools.cache
def workload() -> tuple[VLM, list, list[str]]:
    """(VLM, one video per row, one prompt per row): each video's questions in consecutive rows."""
    model = random_smolvlm("256M", dtype=DTYPE, device=DEVICE)
    vlm = VLM(model, bench_tokenizer(), VideoPreprocessor.for_model(model.config, max_frames=FRAMES))
    videos = [synthetic_video(FRAMES, seed=v) for v in range(VIDEOS)]
    questions = [f"What happens in this video? Question {q + 1}." for q in range(QUESTIONS)]
    return vlm, [video for video in videos for _ in questions], questions * VIDEOS


@torch.no_grad()
def per_row_pixels(videos, prompts, vlm: VLM, *, max_new_tokens: int) -> list[str]:
    """The teacher's prompts with every row's own pixels: the vision tower runs once per row."""
    tokenizer, pad = vlm.tokenizer, pad_id(vlm.tokenizer)
    ids = [tokenizer(teacher_prompt(video, prompt, vlm), add_special_tokens=False)["input_ids"]
           for video, prompt in zip(videos, prompts)]
    input_ids, attention_mask = left_pad(ids, pad, vlm.device)
    pixels, mask = pad_frames([vlm.preprocessor.pixel_values(video) for video in videos],
                              vlm.preprocessor.max_image_size)
    return greedy_answers(vlm.model, None, input_ids, attention_mask, max_new_tokens, pad, tokenizer.eos_token_id,
                          tokenizer, pixel_values=pixels.to(vlm.device, vlm.dtype),
                          pixel_attention_mask=mask.to(vlm.device))


PROVIDERS = {"v2l_fast": video_answers, "per_row_pixels": per_row_pixels}


def test_teacher_answers(benchmark, bench_record):
    vlm, videos, prompts = workload()
    steps = {name: functools.partial(fn, videos, prompts, vlm, max_new_tokens=MAX_NEW_TOKENS)
             for name, fn in PROVIDERS.items()}
    answers = {name: step() for name, step in steps.items()}
    mismatches = sum(a != b for a, b in zip(answers["v2l_fast"], answers["per_row_pixels"]))
    if mismatches and not ON_GPU:  # fp32 on the CPU: the same answers; bf16 may round apart
        pytest.fail(f"answers: expected the per-row answers in fp32, got {mismatches} of {len(prompts)} different")

    def derive(provider, times):
        return dict(answers_differing_from_per_row=mismatches,
                    speedup_of_v2l_fast=min(times[provider]) / min(times["v2l_fast"]))

    harness.interleaved(benchmark, bench_record, steps, rounds=ROUNDS, derive=derive, op="teacher_answers",
                        model="256M", dtype=str(DTYPE).removeprefix("torch."), videos=VIDEOS, questions=QUESTIONS,
                        frames=FRAMES, max_new_tokens=MAX_NEW_TOKENS, rows=len(prompts))
