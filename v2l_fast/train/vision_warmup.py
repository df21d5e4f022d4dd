"""Pretrain a toy VLM's vision tower on the synthetic world's ground truth, before in-context training.

Real VLMs start from a pretrained vision encoder (SmolVLM2's is SigLIP); the toy VLM starts from
nothing, and trained through the answers' cross-entropy alone its 2-layer tower learnt which
colours are present and how many objects there are, but not size or motion, even after 14 000
steps (bench/NOTES.md, "toy replication"). This stage gives it what a pretrained encoder gives a
real VLM: features that already hold the objects' attributes.

An `AttributeProbe` reads a frame's ``<image>`` tokens (the connector's output, what the decoder
sees) through one attention-pooling query per colour of the world (`COLOURS`: colours are unique
within a clip, so a colour names an object) and predicts, per frame and colour, whether that
colour's object is in the frame, its shape, its size and its centre (x, y in frame fractions); a
second head reads the pooled vectors of the first and last frames and predicts the object's
direction of motion. The labels come from each clip's scene (``metadata["scene"]``: `scene_targets`),
never from its questions or answers. Only the vision tower and the connector learn, with the probe;
the probe is dropped afterwards and the decoder is untouched (`train_toy_vlm` then keeps the tower
and connector frozen while the decoder learns to answer).

Loss (`probe_loss`): binary cross-entropy of presence over every (frame, colour); cross-entropy of
shape and size over the present ones; squared error of the centre (sigmoid of two logits) × 50,
so a 0.1-frame error costs about as much as a wrong class at the start of training; cross-entropy
of the direction over the clip's objects. Measured on a 3000-clip world (model S, 16 tokens per
frame, 32 videos per step, lr 2e-3, 1500 steps, 0.19 s per step on 2 cores): presence 99.7 %,
size 99.8 %, direction 98.7 %, centre error 0.036 of the frame on the validation clips; shape
stays near chance (29 %: the 2-layer tower of width 64 does not learn it from these labels in that
time; width 128 did no better in 500 steps). The shipped replication's 1000 steps on 10 000 clips
(the schedule decays to 0 over them) left a weaker probe — presence 60 %, size 66 %, direction
99.7 % — and its VLM still answered size questions at 82 % in context (bench/NOTES.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from v2l_fast.data.manifest import ManifestRow
from v2l_fast.data.synthetic import COLOURS, DIRECTIONS, SHAPES, SIZES, Scene
from v2l_fast.errors import check_int, fail
from v2l_fast.vlm.features import image_tokens
from v2l_fast.vlm.frames import pad_frames
from v2l_fast.vlm.load import VLM
from v2l_fast.vlm.video import Video

IGNORE = -100
# per (frame, colour): presence, shape index, size index, centre x, centre y
FRAME_FIELDS = ("present", "shape", "size", "x", "y")
CENTRE_WEIGHT = 50.0  # see the module docstring
DATA_ORDER_STREAM = 7  # np.random.default_rng([seed, DATA_ORDER_STREAM]): batches of the warm-up


@dataclass
class SceneTargets:
    """Labels of one clip: ``frames`` ``[F, colours, 5]`` float32 (`FRAME_FIELDS`; zeros where a
    colour is absent) and ``direction`` ``[colours]`` int64 (`DIRECTIONS` index, IGNORE if absent)."""

    frames: torch.Tensor
    direction: torch.Tensor


def scene_targets(video: Video, row: ManifestRow) -> SceneTargets:
    """The labels of ``video``'s frames from the scene of its synthetic-world ``row``.

    Frame k shows each object at ``start + (end − start) · t``, ``t = timestamp_k · fps / (frames − 1)``
    (`render_clip` draws frame i at ``i / (frames − 1)``; the clip is written at ``fps``).
    """
    meta = row.metadata
    if not isinstance(meta, dict) or not isinstance(meta.get("scene"), dict):
        fail(f"{row.source or row.id}: metadata.scene", "the scene of a synthetic-world clip (v2l-fast world)",
             "none")
    scene = Scene.from_dict(meta["scene"])
    progress = [min(1.0, t * float(meta["fps"]) / max(1, int(meta["frames"]) - 1)) for t in video.timestamps]
    frames = np.zeros((len(progress), len(COLOURS), len(FRAME_FIELDS)), np.float32)
    direction = np.full(len(COLOURS), IGNORE, np.int64)
    for obj in scene.objects:
        c = list(COLOURS).index(obj.colour)
        (x0, y0), (x1, y1) = obj.start, obj.end
        for k, p in enumerate(progress):
            frames[k, c] = (1.0, SHAPES.index(obj.shape), list(SIZES).index(obj.size), x0 + (x1 - x0) * p,
                            y0 + (y1 - y0) * p)
        direction[c] = list(DIRECTIONS).index(obj.direction)
    return SceneTargets(torch.from_numpy(frames), torch.from_numpy(direction))


class AttributeProbe(torch.nn.Module):
    """Per-colour attention pooling over a frame's ``<image>`` tokens, then linear heads.

    ``forward(tokens [B, F, T, H])`` returns frame logits ``[B, F, colours, 1 + shapes + sizes + 2]``
    (presence, shape, size, centre) and direction logits ``[B, colours, directions]`` read from
    the first and last frames' pooled vectors.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.queries = torch.nn.Parameter(torch.randn(len(COLOURS), hidden_size) / hidden_size**0.5)
        self.key = torch.nn.Linear(hidden_size, hidden_size)
        self.value = torch.nn.Linear(hidden_size, hidden_size)
        self.frame_head = torch.nn.Linear(hidden_size, 1 + len(SHAPES) + len(SIZES) + 2)
        self.direction_head = torch.nn.Linear(2 * hidden_size, len(DIRECTIONS))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.einsum("bfth,ch->bfct", self.key(tokens), self.queries) / self.hidden_size**0.5
        pooled = torch.einsum("bfct,bfth->bfch", scores.softmax(-1), self.value(tokens))
        return self.frame_head(pooled), self.direction_head(torch.cat([pooled[:, 0], pooled[:, -1]], -1))


def frame_tokens(vlm: VLM, videos: Sequence[Video]) -> torch.Tensor:
    """``[B, F, T, H]``: the connector's ``<image>`` tokens of each frame of ``videos`` (equal frame counts)."""
    counts = sorted({len(video.frames) for video in videos})
    if len(counts) != 1:
        fail("videos", "clips of one frame count (a synthetic world's clips)", f"frame counts {counts}")
    pixels, mask = pad_frames([vlm.preprocessor.pixel_values(video) for video in videos],
                              vlm.preprocessor.max_image_size)
    tokens = torch.stack(image_tokens(vlm.model, pixels, mask))
    return tokens.view(len(videos), pixels.shape[1], -1, tokens.shape[-1])


def probe_loss(frame_logits: torch.Tensor, direction_logits: torch.Tensor, frames: torch.Tensor,
               direction: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The warm-up loss (module docstring) and the probe's accuracies on this batch.

    Returns ``(loss, metrics)``: metrics are the presence, shape, size and direction accuracies
    and the mean absolute centre error (frame fractions).
    """
    shape_end = 1 + len(SHAPES)
    size_end = shape_end + len(SIZES)
    present = frames[..., 0] > 0
    on = frame_logits[present]
    truth = frames[present]
    centre = on[:, size_end:].sigmoid()
    moving = direction != IGNORE
    loss = (F.binary_cross_entropy_with_logits(frame_logits[..., 0], frames[..., 0])
            + F.cross_entropy(on[:, 1:shape_end], truth[:, 1].long())
            + F.cross_entropy(on[:, shape_end:size_end], truth[:, 2].long())
            + CENTRE_WEIGHT * ((centre - truth[:, 3:]) ** 2).sum(-1).mean()
            + F.cross_entropy(direction_logits[moving], direction[moving]))
    with torch.no_grad():
        metrics = {
            "present": float(((frame_logits[..., 0] > 0) == present).float().mean()),
            "shape": float((on[:, 1:shape_end].argmax(-1) == truth[:, 1].long()).float().mean()),
            "size": float((on[:, shape_end:size_end].argmax(-1) == truth[:, 2].long()).float().mean()),
            "direction": float((direction_logits[moving].argmax(-1) == direction[moving]).float().mean()),
            "centre_error": float((centre - truth[:, 3:]).abs().mean()),
        }
    return loss, metrics


def _batch(vlm: VLM, items: Sequence[tuple[Video, Sequence[ManifestRow]]]):
    targets = [scene_targets(video, rows[0]) for video, rows in items]
    device = next(vlm.model.parameters()).device
    return (frame_tokens(vlm, [video for video, _ in items]), torch.stack([t.frames for t in targets]).to(device),
            torch.stack([t.direction for t in targets]).to(device))


def vision_parameters(vlm: VLM) -> list[torch.nn.Parameter]:
    """The parameters the warm-up trains: the vision tower's and the connector's."""
    inner = vlm.model.model
    return list(inner.vision_model.parameters()) + list(inner.connector.parameters())


def warm_up_vision(vlm: VLM, train: Sequence[tuple[Video, Sequence[ManifestRow]]], *, steps: int,
                   batch_videos: int = 32, lr: float = 2e-3, seed: int = 0,
                   val: Sequence[tuple[Video, Sequence[ManifestRow]]] = (), progress: bool = True) -> dict:
    """Train ``vlm``'s vision tower and connector with an `AttributeProbe` for ``steps`` steps.

    ``train`` and ``val`` are `load_questions` results of a synthetic world (each video with its
    rows; the first row's scene gives the labels). AdamW (weight decay 0.01), cosine schedule
    with 5 % linear warm-up, clipping at 1.0; each step takes ``batch_videos`` clips drawn without
    replacement from ``np.random.default_rng([seed, DATA_ORDER_STREAM])``. Returns the probe's
    metrics on ``val`` (or on the last batch without ``val``), ``steps`` and ``seconds``.
    """
    from transformers import get_cosine_schedule_with_warmup

    check_int("steps", steps, 1)
    check_int("batch_videos", batch_videos, 1)
    if not train:
        fail("train", "at least one video", "none")
    device = next(vlm.model.parameters()).device
    probe = AttributeProbe(vlm.model.config.text_config.hidden_size).to(device)
    params = vision_parameters(vlm) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, steps // 20, steps)
    rng = np.random.default_rng([seed, DATA_ORDER_STREAM])
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    for _ in tqdm(range(steps), desc="vision warm-up", disable=not progress):
        picked = rng.choice(len(train), min(batch_videos, len(train)), replace=False)
        tokens, frames, direction = _batch(vlm, [train[i] for i in picked])
        loss, metrics = probe_loss(*probe(tokens), frames, direction)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    if val:
        with torch.no_grad():
            tokens, frames, direction = _batch(vlm, val)
            metrics = probe_loss(*probe(tokens), frames, direction)[1]
    return {**{k: round(v, 4) for k, v in metrics.items()}, "steps": steps, "seconds": round(seconds, 1),
            "on": "val" if val else "last batch"}
