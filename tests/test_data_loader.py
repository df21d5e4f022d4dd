"""The video loader: rows grouped by video, the same batches from worker processes as in-process,
seeded shuffling, and unreadable videos as one-line errors (or skipped and listed)."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

from v2l_fast.api import pad_id
from v2l_fast.data.loader import VideoQALoader
from v2l_fast.data.manifest import read_manifest
from v2l_fast.testing import write_test_video
from v2l_fast.vlm.factory import tiny_vlm
from v2l_fast.vlm.frames import DEFAULT_INSTRUCTION, build_video_batch
from v2l_fast.vlm.video import VideoError, read_video

# (row id, clip, question, answer): clip c has c + 1 questions, interleaved in the file
ROWS = [("c0-q0", 0), ("c1-q0", 1), ("c2-q0", 2), ("c1-q1", 1), ("c2-q1", 2), ("c2-q2", 2), ("c3-q0", 3)]


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(seed=2, max_frames=3)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    (root / "clips").mkdir()
    for clip in range(4):
        write_test_video(root / "clips" / f"c{clip}.mp4", num_frames=4 + 3 * clip, fps=4, seed=clip)
    with open(root / "m.jsonl", "w") as f:
        for row_id, clip in ROWS:
            f.write(json.dumps({"id": row_id, "video_path": f"clips/c{clip}.mp4", "task_type": "qa",
                                "prompt": f"What is in clip {clip}? ({row_id})", "target_text": f"clip {clip}",
                                "dataset": "test", "split": "train"}) + "\n")
    return root / "m.jsonl"


def collect(loader) -> list:
    return [(batch.ids, batch.prompts, batch.targets, batch.videos) for batch in loader]


def test_rows_are_grouped_by_video_and_split_by_max_questions(vlm, manifest):
    rows = read_manifest(manifest).rows
    batches = collect(VideoQALoader(rows, vlm=vlm, videos_per_batch=2))
    assert [ids for ids, *_ in batches] == [[["c0-q0"], ["c1-q0", "c1-q1"]], [["c2-q0", "c2-q1", "c2-q2"], ["c3-q0"]]]
    assert batches[0][2] == [["clip 0"], ["clip 1", "clip 1"]]
    split = collect(VideoQALoader(rows, vlm=vlm, videos_per_batch=3, max_questions_per_video=2))
    assert [ids for ids, *_ in split] == [[["c0-q0"], ["c1-q0", "c1-q1"], ["c2-q0", "c2-q1"]],
                                          [["c2-q2"], ["c3-q0"]]]


def test_a_batch_is_the_internalisation_input_of_its_videos(vlm, manifest):
    rows = read_manifest(manifest).rows
    batch = next(iter(VideoQALoader(rows, vlm=vlm, videos_per_batch=2)))
    clips = [read_video(manifest.parent / "clips" / f"c{c}.mp4", max_frames=3) for c in (0, 1)]
    expected = build_video_batch(clips, DEFAULT_INSTRUCTION, vlm.tokenizer, vlm.preprocessor,
                                 pad_token_id=pad_id(vlm.tokenizer))
    for name in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        assert torch.equal(getattr(batch.videos, name), getattr(expected, name)), name


def test_worker_processes_give_the_same_shuffled_batches_as_in_process(vlm, manifest):
    """This process decodes first, then the workers: with forked workers and PyAV 18.1.1 they hung."""
    assert VideoQALoader(read_manifest(manifest).rows, vlm=vlm, num_workers=2).loader.multiprocessing_context \
        is not None or "forkserver" not in multiprocessing.get_all_start_methods()
    rows = read_manifest(manifest).rows
    options = dict(vlm=vlm, videos_per_batch=2, max_questions_per_video=2, shuffle=True, seed=7)
    in_process = VideoQALoader(rows, num_workers=0, **options)
    workers = VideoQALoader(rows, num_workers=2, **options)
    for epoch in range(2):
        ours, theirs = collect(in_process), collect(workers)
        assert [b[0] for b in ours] == [b[0] for b in theirs], epoch
        for a, b in zip(ours, theirs):
            assert torch.equal(a[3].input_ids, b[3].input_ids) and torch.equal(a[3].pixel_values, b[3].pixel_values)

    def order(seed: int) -> tuple[str, ...]:
        return tuple(ids[0] for batch in VideoQALoader(rows, **{**options, "seed": seed}) for ids in batch.ids)

    assert order(7) == order(7) and len({order(seed) for seed in range(4)}) > 1  # the seed decides the order


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_video_is_one_line_naming_the_file_and_row(vlm, manifest, tmp_path, num_workers):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    rows = read_manifest(manifest).rows
    bad = read_manifest(_manifest_with(tmp_path, manifest, broken)).rows
    loader = VideoQALoader(rows[:1] + bad, vlm=vlm, videos_per_batch=1, num_workers=num_workers)
    with pytest.raises(VideoError) as error:
        collect(loader)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{tmp_path / 'm.jsonl'}:1 (id 'bad-0' and 1 more row): video_path: ")
    assert str(broken) in message


def test_skip_bad_rows_leaves_out_the_video_and_lists_it(vlm, manifest, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    rows = read_manifest(manifest).rows
    bad = read_manifest(_manifest_with(tmp_path, manifest, broken)).rows
    batches = list(VideoQALoader(bad + rows[:2], vlm=vlm, videos_per_batch=2, skip_bad_rows=True))
    assert [b.ids for b in batches] == [[["c0-q0"]], [["c1-q0"]]]
    assert batches[0].videos.input_ids.shape[0] == 1
    assert len(batches[0].skipped) == 1 and "id 'bad-0'" in batches[0].skipped[0]
    assert batches[1].skipped == []


def test_bad_options_are_refused(vlm, manifest):
    rows = read_manifest(manifest).rows
    with pytest.raises(ValueError, match="^videos_per_batch: expected an int >= 1, got 0$"):
        VideoQALoader(rows, vlm=vlm, videos_per_batch=0)
    with pytest.raises(ValueError, match="^max_questions_per_video: expected a positive int or None, got 0$"):
        VideoQALoader(rows, vlm=vlm, max_questions_per_video=0)
    with pytest.raises(ValueError, match="^rows: expected at least one manifest row, got none$"):
        VideoQALoader([], vlm=vlm)


def _manifest_with(folder, manifest, video) -> str:
    """A manifest in ``folder`` of two questions about ``video``."""
    path = folder / "m.jsonl"
    with open(path, "w") as f:
        for i in range(2):
            f.write(json.dumps({"id": f"bad-{i}", "video_path": str(video), "prompt": "What?"}) + "\n")
    return str(path)
