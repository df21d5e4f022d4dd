"""The toy VLM's vision warm-up: scene labels per frame, the probe's loss, what the warm-up trains."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from v2l_fast.data.synthetic import COLOURS, DIRECTIONS, SHAPES, SIZES, Scene, generate_world
from v2l_fast.train.toy_vlm import TOY_INFO, build_toy_vlm, load_questions, train_toy_vlm
from v2l_fast.train.vision_warmup import (
    IGNORE,
    AttributeProbe,
    frame_tokens,
    probe_loss,
    scene_targets,
    vision_parameters,
    warm_up_vision,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, num_train=6, num_val=2, num_heldout=0, seed=11, progress=False)
    return root


@pytest.fixture(scope="module")
def clips(world):
    vlm = build_toy_vlm("S", seed=0)
    return vlm, load_questions(world / "train.jsonl", vlm), load_questions(world / "val.jsonl", vlm)


def test_labels_follow_each_object_from_its_start_to_its_end(clips):
    _, train, _ = clips
    for video, rows in train:
        scene = Scene.from_dict(rows[0].metadata["scene"])
        labels = scene_targets(video, rows[0])
        assert labels.frames.shape == (len(video.frames), len(COLOURS), 5)
        for obj in scene.objects:
            c = list(COLOURS).index(obj.colour)
            first, last = labels.frames[0, c], labels.frames[-1, c]
            assert first[:3].tolist() == [1.0, SHAPES.index(obj.shape), list(SIZES).index(obj.size)]
            assert first[3:].tolist() == pytest.approx(obj.start, abs=1e-6)
            assert last[3:].tolist() == pytest.approx(obj.end, abs=1e-6)
            assert labels.direction[c] == list(DIRECTIONS).index(obj.direction)
        absent = [list(COLOURS).index(c) for c in COLOURS if c not in {o.colour for o in scene.objects}]
        assert (labels.frames[:, absent] == 0).all() and (labels.direction[absent] == IGNORE).all()


def test_a_row_without_a_scene_is_refused_in_one_line(clips):
    _, train, _ = clips
    video, rows = train[0]
    bare = replace(rows[0], metadata={"clip": "x"}, source="train.jsonl:3")
    with pytest.raises(ValueError, match=r"^train.jsonl:3: metadata.scene: expected the scene of a synthetic-world "
                                         r"clip \(v2l-fast world\), got none$"):
        scene_targets(video, bare)


def test_the_probe_scores_labels_it_is_handed_as_logits_perfectly(clips):
    """Logits built from the labels give accuracy 1 and no centre error; the loss is far below
    that of the same labels read from zero logits."""
    _, train, _ = clips
    labels = [scene_targets(video, rows[0]) for video, rows in train[:3]]
    frames = torch.stack([t.frames for t in labels])
    direction = torch.stack([t.direction for t in labels])
    big = 30.0
    logits = torch.zeros(*frames.shape[:3], 1 + len(SHAPES) + len(SIZES) + 2, dtype=torch.float64)
    logits[..., 0] = torch.where(frames[..., 0] > 0, big, -big)
    logits[..., 1:1 + len(SHAPES)] = big * torch.nn.functional.one_hot(frames[..., 1].long(), len(SHAPES))
    logits[..., 1 + len(SHAPES):-2] = big * torch.nn.functional.one_hot(frames[..., 2].long(), len(SIZES))
    logits[..., -2:] = torch.logit(frames[..., 3:].double().clamp(1e-6, 1 - 1e-6))
    direction_logits = big * torch.nn.functional.one_hot(direction.clamp(min=0), len(DIRECTIONS)).double()
    loss, metrics = probe_loss(logits, direction_logits, frames.double(), direction)
    assert metrics == {"present": 1.0, "shape": 1.0, "size": 1.0, "direction": 1.0,
                       "centre_error": pytest.approx(0.0, abs=1e-6)}
    blind_loss, blind = probe_loss(torch.zeros_like(logits), torch.zeros_like(direction_logits), frames.double(),
                                   direction)
    assert loss < 1e-3 < blind_loss and blind["centre_error"] > 0.05


def test_the_probe_reads_every_frame_of_every_clip(clips):
    vlm, train, _ = clips
    tokens = frame_tokens(vlm, [video for video, _ in train[:2]])
    assert tokens.shape == (2, 8, vlm.preprocessor.image_seq_len, vlm.model.config.text_config.hidden_size)
    frame_logits, direction_logits = AttributeProbe(tokens.shape[-1])(tokens)
    assert frame_logits.shape == (2, 8, len(COLOURS), 1 + len(SHAPES) + len(SIZES) + 2)
    assert direction_logits.shape == (2, len(COLOURS), len(DIRECTIONS))


def test_clips_of_different_lengths_are_refused_in_one_line(clips):
    from v2l_fast.vlm.video import Video

    vlm, train, _ = clips
    short = Video.from_frames(train[1][0].frames[:5], fps=1)
    with pytest.raises(ValueError, match=r"^videos: expected clips of one frame count \(a synthetic world's clips\), "
                                         r"got frame counts \[5, 8\]$"):
        frame_tokens(vlm, [train[0][0], short])


def test_the_warm_up_trains_the_vision_tower_and_connector_only(world):
    vlm = build_toy_vlm("S", seed=0)
    train = load_questions(world / "train.jsonl", vlm)
    before = {name: p.detach().clone() for name, p in vlm.model.named_parameters()}
    trained = {id(p) for p in vision_parameters(vlm)}
    result = warm_up_vision(vlm, train, steps=3, batch_videos=4, progress=False)
    for name, p in vlm.model.named_parameters():
        assert torch.equal(p, before[name]) != (id(p) in trained), name
    assert result["steps"] == 3 and result["on"] == "last batch"
    assert set(result) >= {"present", "shape", "size", "direction", "centre_error", "seconds"}


def test_the_warm_up_is_a_function_of_its_seed(world):
    runs = []
    for seed in (0, 0, 1):
        vlm = build_toy_vlm("S", seed=0)
        warm_up_vision(vlm, load_questions(world / "train.jsonl", vlm), steps=2, batch_videos=2, seed=seed,
                       progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in vision_parameters(vlm)]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_after_the_warm_up_only_the_decoder_learns_and_the_run_records_it(world, tmp_path, monkeypatch):
    import v2l_fast.train.toy_vlm as toy_vlm

    warmed = {}

    def keep_warmed_copy(vlm, *args, **kwargs):
        result = warm_up_vision(vlm, *args, **kwargs)
        warmed.update({name: p.detach().clone() for name, p in vlm.model.named_parameters()})
        return result

    monkeypatch.setattr(toy_vlm, "warm_up_vision", keep_warmed_copy)
    out = train_toy_vlm(world, tmp_path / "vlm", steps=2, batch_videos=2, vision_warmup_steps=2, progress=False)
    saved = load_file(f"{out}/model.safetensors")
    vision = [name for name in warmed if ".vision_model." in name or ".connector." in name]
    assert vision and all(torch.equal(saved[name], warmed[name]) for name in vision)
    assert not all(torch.equal(saved[name], warmed[name]) for name in warmed if name not in vision)
    info = json.loads((Path(out) / TOY_INFO).read_text())
    assert info["vision_warmup"]["steps"] == 2 and info["vision_warmup"]["on"] == "val"
    first = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"vision_warmup": info["vision_warmup"]}


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_bad_warm_up_length_is_refused_in_one_line(world, tmp_path, value):
    with pytest.raises(ValueError, match=rf"^vision_warmup_steps: expected an int >= 0 \(0: no warm-up\), "
                                         rf"got {value!r}$"):
        train_toy_vlm(world, tmp_path / "out", steps=1, vision_warmup_steps=value, progress=False)
