"""The synthetic video world: determinism, splits, the authors' row format, answers that the
frames (rendered and decoded) really give, a low blind-guess prior, the CLI and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from v2l_fast.cli import main
from v2l_fast.data.manifest import read_manifest
from v2l_fast.data.synthetic import (
    ANSWERS,
    COLOURS,
    COUNTS,
    DATASET,
    SPLITS,
    Scene,
    SceneObject,
    answer_prior,
    caption_for,
    clip_rows,
    generate_world,
    questions_for,
    render_clip,
    sample_scene,
    write_clip,
)
from v2l_fast.vlm.video import read_video

WORLD = {"num_train": 6, "num_val": 3, "num_heldout": 3, "seed": 5, "progress": False}
ROW_KEYS = {"id", "video_path", "task_type", "prompt", "target_text", "dataset", "split", "metadata"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, **WORLD)
    return out


def rows_of(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def all_rows(folder: Path) -> list[dict]:
    return [row for split in SPLITS for row in rows_of(folder, split)]


def clips_of(rows: list[dict]) -> dict[str, dict]:
    """clip id → (scene dict, frames, size, video_path) of the rows."""
    return {r["metadata"]["clip"]: r for r in rows}


# ---------------------------------------------------------------- reading the frames


def perceive(frame: np.ndarray, tolerance: float) -> dict[str, np.ndarray]:
    """colour name → mask of the pixels within ``tolerance`` of that palette colour."""
    pixels = frame.astype(np.int32)
    masks = {}
    for name, rgb in COLOURS.items():
        mask = np.sqrt(((pixels - np.array(rgb)) ** 2).sum(-1)) < tolerance
        if mask.sum() >= 4:
            masks[name] = mask
    return masks


def centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean(), rows.mean()]) / mask.shape[0]  # (x, y) in frame fractions


def shape_of(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = mask.sum() / (height * width)
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    middle = (rows.min() + rows.max()) / 2
    return "triangle" if (rows < middle).sum() < 0.6 * (rows > middle).sum() else "diamond"


def size_of(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    return "large" if extent > 0.19 * mask.shape[0] else "small"


def direction_of(first: np.ndarray, last: np.ndarray) -> str:
    dx, dy = centroid(last) - centroid(first)
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def seen_objects(frames: np.ndarray) -> dict[str, dict]:
    """What the rendered frames show: colour → shape, size, direction, final centroid."""
    first, last = perceive(frames[0], 1), perceive(frames[-1], 1)
    assert first.keys() == last.keys()
    return {colour: {"shape": shape_of(first[colour]), "size": size_of(first[colour]),
                     "direction": direction_of(first[colour], last[colour]), "end": centroid(last[colour])}
            for colour in first}


def the_one(objects: dict[str, dict], **facts) -> str:
    """The colour of the only object with ``facts`` (an ambiguous question fails here)."""
    found = [c for c, o in objects.items() if all(o[k] == v for k, v in facts.items())]
    assert len(found) == 1, f"{facts} matches {found}"
    return found[0]


def named(objects: dict[str, dict], ref: str) -> str:
    """The colour of the object ``ref`` names: 'red shape', 'circle' or 'small circle'."""
    words = ref.split()
    if words[-1] == "shape":
        return words[0]
    return the_one(objects, shape=words[-1], **({"size": words[0]} if len(words) == 2 else {}))


def answer_from_frames(prompt: str, objects: dict[str, dict]) -> str:
    """Answer ``prompt`` from what the frames show, without the scene metadata."""
    sides = {"top": (1, -1), "bottom": (1, 1), "left side": (0, -1), "right side": (0, 1)}
    patterns = [
        (r"What colour is the shape that moves (\w+)\?|Which colour moves (\w+)\?",
         lambda d: the_one(objects, direction=d)),
        (r"(?:What|Which) colour is the (.+)\?", lambda ref: named(objects, ref)),
        (r"What shape is the (\w+) object\?|Which shape is (\w+)\?", lambda c: objects[c]["shape"]),
        (r"What size is the (\w+) shape\?|Is the (\w+) shape small or large\?", lambda c: objects[c]["size"]),
        (r"(?:Which way|In which direction) does the (.+) move\?",
         lambda ref: objects[named(objects, ref)]["direction"]),
        (r"How many shapes (?:are there|are in the video)\?()", lambda _: COUNTS[len(objects) - 1]),
        (r"Which shape (?:ends nearest|is closest to) the (.+?)(?: at the end)?\?", lambda side: end_shape(side)),
    ]

    def end_shape(side: str) -> str:
        axis, sign = sides[side]
        ranked = sorted(objects.values(), key=lambda o: sign * o["end"][axis], reverse=True)
        assert sign * (ranked[0]["end"][axis] - ranked[1]["end"][axis]) > 0.05, "no clear winner"
        return ranked[0]["shape"]

    for pattern, solve in patterns:
        match = re.fullmatch(pattern, prompt)
        if match:
            return solve(next(g for g in match.groups() if g is not None))
    raise AssertionError(f"unknown question {prompt!r}")


# ---------------------------------------------------------------- tests


def test_same_seed_gives_identical_manifests_videos_and_frames(world, tmp_path):
    generate_world(tmp_path, **WORLD)
    for name in [f"{s}.jsonl" for s in SPLITS] + ["world.json"]:
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes(), name
    videos = sorted(p.name for p in (world / "videos").iterdir())
    assert videos == sorted(p.name for p in (tmp_path / "videos").iterdir())
    for name in videos:
        assert (tmp_path / "videos" / name).read_bytes() == (world / "videos" / name).read_bytes(), name
    scene = Scene.from_dict(rows_of(world, "train")[0]["metadata"]["scene"])
    np.testing.assert_array_equal(render_clip(scene), render_clip(scene))


def test_another_seed_gives_another_world(world, tmp_path):
    generate_world(tmp_path, **{**WORLD, "seed": 6})
    for split in SPLITS:
        mine = {json.dumps(r["metadata"]["scene"]) for r in rows_of(world, split)}
        theirs = {json.dumps(r["metadata"]["scene"]) for r in rows_of(tmp_path, split)}
        assert not mine & theirs, split


def test_splits_never_share_a_clip_and_heldout_seed_draws_a_fresh_heldout_set(world, tmp_path):
    scenes = {split: {json.dumps(r["metadata"]["scene"]) for r in rows_of(world, split)} for split in SPLITS}
    assert [len(scenes[s]) for s in SPLITS] == [WORLD["num_train"], WORLD["num_val"], WORLD["num_heldout"]]
    assert not scenes["train"] & scenes["val"] and not scenes["train"] & scenes["heldout"]
    assert not scenes["val"] & scenes["heldout"]

    generate_world(tmp_path, **{**WORLD, "num_train": 8, "heldout_seed": 99})
    bigger = [json.dumps(r["metadata"]["scene"]) for r in rows_of(tmp_path, "train")]
    assert scenes["train"] <= set(bigger)  # a bigger world starts with the clips of a smaller one
    assert rows_of(tmp_path, "val") == rows_of(world, "val")
    fresh = {json.dumps(r["metadata"]["scene"]) for r in rows_of(tmp_path, "heldout")}
    assert len(fresh) == WORLD["num_heldout"] and not fresh & scenes["heldout"] and not fresh & set(bigger)


def test_rows_follow_the_authors_format_and_the_project_reader_accepts_them(world):
    for split in SPLITS:
        read = read_manifest(world / f"{split}.jsonl", require_targets=True)
        assert not read.bad and len(read.rows) == len(rows_of(world, split))
        for row in rows_of(world, split):
            assert set(row) == ROW_KEYS
            assert row["dataset"] == DATASET and row["split"] == split
            assert (world / row["video_path"]).is_file() and not Path(row["video_path"]).is_absolute()
            assert row["task_type"] in ("qa", "caption") and row["target_text"] and row["prompt"]
        by_clip: dict[str, list[dict]] = {}
        for row in rows_of(world, split):
            by_clip.setdefault(row["metadata"]["clip"], []).append(row)
        for clip, rows in by_clip.items():
            assert [r["task_type"] for r in rows] == ["qa"] * (len(rows) - 1) + ["caption"], clip
            types = [r["metadata"]["question_type"] for r in rows[:-1]]
            assert 1 <= len(types) <= 4 and len(set(types)) == len(types), clip
            assert {r["video_path"] for r in rows} == {f"videos/{clip}.mp4"}
    assert not [p for p in world.rglob("*") if ".tmp" in p.name]
    info = json.loads((world / "world.json").read_text())
    assert info["clips"] == {"train": 6, "val": 3, "heldout": 3} and info["answers"] == {
        t: list(a) for t, a in ANSWERS.items()}


def test_every_answer_is_read_off_the_rendered_frames(world):
    rows = all_rows(world)
    checked = set()
    for clip, row in clips_of(rows).items():
        scene = Scene.from_dict(row["metadata"]["scene"])
        objects = seen_objects(render_clip(scene, row["metadata"]["frames"], row["metadata"]["size"]))
        assert {c: (o["shape"], o["size"], o["direction"]) for c, o in objects.items()} == {
            o.colour: (o.shape, o.size, o.direction) for o in scene.objects}, clip
        for qa in (r for r in rows if r["metadata"]["clip"] == clip and r["task_type"] == "qa"):
            assert answer_from_frames(qa["prompt"], objects) == qa["target_text"], qa["id"]
            assert qa["target_text"] in ANSWERS[qa["metadata"]["question_type"]]
            checked.add(qa["metadata"]["question_type"])
    assert len(checked) >= 6, checked


def test_answers_of_many_scenes_are_read_off_their_frames():
    for i in range(60):
        rng = np.random.default_rng([11, i])
        scene = sample_scene(rng)
        objects = seen_objects(render_clip(scene))
        for q in questions_for(scene, rng, k=7):
            assert answer_from_frames(q.prompt, objects) == q.answer, (i, q)


def test_decoded_videos_show_every_object_in_every_frame_and_its_motion(world):
    for clip, row in clips_of(all_rows(world)).items():
        video = read_video(world / row["video_path"])
        frames, size = row["metadata"]["frames"], row["metadata"]["size"]
        assert video.frames.shape == (frames, size, size, 3), clip
        scene = Scene.from_dict(row["metadata"]["scene"])
        for t, frame in enumerate(video.frames):  # the encoder must not wash a small shape out
            assert set(perceive(frame, 60)) == {o.colour for o in scene.objects}, (clip, t)
        first, last = perceive(video.frames[0], 60), perceive(video.frames[-1], 60)
        for obj in scene.objects:
            assert direction_of(first[obj.colour], last[obj.colour]) == obj.direction, (clip, obj)
            assert np.abs(centroid(first[obj.colour]) - obj.start).max() < 0.06, (clip, obj)


def test_questions_are_asked_only_when_their_answer_is_unambiguous():
    scene = Scene("grey", "plain", 0, (
        SceneObject("circle", "red", "small", "left", (0.7, 0.2), (0.4, 0.2)),
        SceneObject("circle", "blue", "large", "left", (0.7, 0.6), (0.4, 0.6)),
        SceneObject("square", "green", "small", "up", (0.15, 0.8), (0.15, 0.45)),
    ))
    prompts = {q.prompt: q.answer for i in range(300) for q in questions_for(scene, np.random.default_rng(i), k=7)}
    assert "What colour is the circle?" not in prompts and "Which way does the circle move?" not in prompts
    assert prompts["What colour is the small circle?"] == "red" and prompts["What colour is the square?"] == "green"
    assert prompts["Which colour moves up?"] == "green" and "Which colour moves left?" not in prompts
    # Ends: red circle top (0.2) vs green square (0.45): clear; left: green at 0.15 vs 0.4: clear.
    assert prompts["Which shape ends nearest the top?"] == "circle"
    assert prompts["Which shape ends nearest the left side?"] == "square"
    assert "Which shape ends nearest the right side?" not in prompts  # both circles end at x = 0.4
    assert prompts["How many shapes are there?"] == "three"


def test_caption_names_every_object_and_the_background():
    scene = Scene("white", "noisy", 3, (
        SceneObject("triangle", "yellow", "large", "down", (0.3, 0.2), (0.3, 0.6)),
        SceneObject("diamond", "blue", "small", "right", (0.2, 0.85), (0.6, 0.85)),
    ))
    assert caption_for(scene) == ("A large yellow triangle moves down and a small blue diamond moves right "
                                  "on a noisy white background.")
    caption = clip_rows("train-00000", "train", scene, [], frames=8, size=64)[-1]
    assert caption["task_type"] == "caption" and caption["target_text"] == caption_for(scene)


def test_a_blind_guesser_scores_low():
    rows = []
    for i in range(1500):
        rng = np.random.default_rng([21, i])
        scene = sample_scene(rng)
        rows += clip_rows(f"c{i}", "train", scene, questions_for(scene, rng), frames=8, size=64)
    by_type = answer_prior(rows)
    for question_type, answers in ANSWERS.items():
        assert by_type[question_type] <= 1 / len(answers) + 0.08, (question_type, by_type)
    assert by_type["all"] <= 0.35, by_type
    assert answer_prior(rows, key="prompt")["all"] <= 0.40
    # A world that always answers "red" would fail the check.
    assert answer_prior([{**r, "target_text": "red"} for r in rows])["all"] == 1.0


def test_clips_are_rendered_at_the_requested_frames_and_size():
    scene = sample_scene(np.random.default_rng(0))
    video = render_clip(scene, frames=5, size=32)
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8
    assert set(perceive(video[0], 1)) == {o.colour for o in scene.objects}


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 30}, "size: expected an even integer ≥ 32 (pixels per side), got 30"),
    ({"size": 16}, "size: expected an even integer ≥ 32 (pixels per side), got 16"),
    ({"frames": 1}, "frames: expected an integer ≥ 2, got 1"),
    ({"num_train": 0}, "num_train: expected an integer ≥ 1, got 0"),
    ({"num_val": True}, "num_val: expected an integer ≥ 0, got True"),
    ({"seed": -1}, "seed: expected an integer ≥ 0, got -1"),
    ({"heldout_seed": 1.5}, "heldout_seed: expected an integer ≥ 0, got 1.5"),
    ({"questions_per_clip": 0}, "questions_per_clip: expected an integer ≥ 1, got 0"),
])
def test_bad_world_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        generate_world(tmp_path, **{**WORLD, **kwargs})
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_bad_scene_rng_frames_and_prior_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^frames: expected a non-empty uint8 array \[T, H, W, 3\], got float64"):
        write_clip(tmp_path / "x.mp4", np.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"^scene: expected a Scene, got dict$"):
        render_clip({"objects": []})
    with pytest.raises(ValueError, match=r"^rng: expected a numpy.random.Generator, got int$"):
        sample_scene(0)
    with pytest.raises(ValueError, match=r"^rng: expected a numpy.random.Generator, got int$"):
        questions_for(sample_scene(np.random.default_rng(0)), 0)
    with pytest.raises(ValueError, match=r"^key: expected 'question_type' or 'prompt', got 'answer'$"):
        answer_prior([], key="answer")
    with pytest.raises(ValueError, match=r"^rows: expected at least one question row \(task_type 'qa'\), got none$"):
        answer_prior([])


def test_cli_world_writes_the_world_and_reports_it(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["world", str(out), "--train", "3", "--val", "1", "--heldout", "2", "--seed", "4",
                 "--frames", "4", "--size", "32", "--quiet"]) == 0
    report = capsys.readouterr().out
    for split, clips in (("train", 3), ("val", 1), ("heldout", 2)):
        assert re.search(rf"{split}\s+{clips} clips\s+\d+ rows\s+{re.escape(str(out / split))}\.jsonl", report)
        assert len(clips_of(rows_of(out, split))) == clips
    video = read_video(out / rows_of(out, "val")[0]["video_path"])
    assert video.frames.shape == (4, 32, 32, 3)


def test_cli_world_refuses_a_bad_size_in_one_line(tmp_path, capsys):
    assert main(["world", str(tmp_path / "w"), "--train", "2", "--size", "30", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == "v2l-fast world: error: size: expected an even integer ≥ 32 (pixels per side), got 30\n"
