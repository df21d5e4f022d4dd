"""JSONL manifests: the authors' rows read and written back, every kind of bad row reported as one
line ``FILE:LINE: FIELD: expected X, got Y``, --skip-bad-rows keeping the rest, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from v2l_fast.data import manifest as manifest_module
from v2l_fast.data.manifest import ManifestRow, read_manifest, write_manifest

AUTHORS_ROW = {  # a row as the authors' build_finevideo_stage1_manifest writes it
    "id": "train-000017-scene", "video_path": "clips/000017_s2.mp4", "task_type": "scene",
    "prompt": "Describe what is happening in this scene.", "target_text": "A man slices onions in a kitchen.",
    "dataset": "finevideo", "split": "train", "metadata": {"dataset": "finevideo", "scene_index": 2},
    "clip_start_sec": 12.5, "clip_end_sec": 19.0,
}


def write_lines(path, lines) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


@pytest.fixture
def root(tmp_path):
    """A data folder with two (empty-named, existing) clip files."""
    (tmp_path / "clips").mkdir()
    for name in ("000017_s2.mp4", "000018_s0.mp4"):
        (tmp_path / "clips" / name).write_bytes(b"x")
    return tmp_path


def row(**changes) -> dict:
    out = dict(AUTHORS_ROW, **changes)
    return {k: v for k, v in out.items() if v is not DROP}


DROP = object()


def test_authors_row_reads_resolves_and_writes_back_unchanged(root):
    other = {"id": "val-000018-full", "video_path": "clips/000018_s0.mp4", "prompt": "Summarize this video."}
    path = write_lines(root / "m.jsonl", [AUTHORS_ROW, "", other])
    rows, bad = read_manifest(path)
    assert bad == [] and [r.id for r in rows] == ["train-000017-scene", "val-000018-full"]
    first, second = rows
    assert first.video_file == str(root / "clips" / "000017_s2.mp4") and first.source == f"{path}:1"
    assert first.clip_start_sec == 12.5 and first.metadata == {"dataset": "finevideo", "scene_index": 2}
    # absent optional fields take the authors' defaults; the blank line 2 is skipped
    assert (second.target_text, second.task_type, second.dataset, second.split, second.metadata) == \
        ("", "caption", "unknown", None, {})
    assert second.source == f"{path}:3"
    out = root / "copy.jsonl"
    write_manifest(rows, out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[0] == AUTHORS_ROW and list(written[0]) == list(AUTHORS_ROW)
    assert "clip_start_sec" not in written[1] and written[1]["target_text"] == ""
    assert read_manifest(out).rows == rows


def test_data_root_and_absolute_paths(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("manifests")
    absolute = str(root / "clips" / "000018_s0.mp4")
    path = write_lines(elsewhere / "m.jsonl", [AUTHORS_ROW, row(id="b", video_path=absolute)])
    rows = read_manifest(path, data_root=root).rows
    assert [r.video_file for r in rows] == [str(root / "clips" / "000017_s2.mp4"), absolute]
    with pytest.raises(ValueError, match=r"m\.jsonl:1: video_path: expected an existing video file, got "
                                         r"\"clips/000017_s2\.mp4\" \(resolved to .*manifests.*not found\)"):
        read_manifest(path)  # resolved against the manifest's own folder, where there are no clips


BAD_ROWS = [
    ("missing prompt", row(prompt=DROP), "prompt", "expected a field present in every row, got a row without it"),
    ("id is a number", row(id=17), "id", "expected a non-empty string, got 17"),
    ("blank prompt", row(prompt="  "), "prompt", "expected a non-empty string, got \"  \""),
    ("metadata is a list", row(metadata=["a"]), "metadata", "expected a JSON object, got [\"a\"]"),
    ("split is a number", row(split=1), "split", "expected a string or null, got 1"),
    ("negative clip time", row(clip_start_sec=-1), "clip_start_sec", "expected a number of seconds >= 0"),
    ("clip ends before it starts", row(clip_end_sec=3.0), "clip_end_sec", "expected a time after clip_start_sec"),
    ("misspelt field", row(target_txt="x"), "target_txt", "expected only the manifest fields"),
    ("truncated JSON", json.dumps(AUTHORS_ROW)[:-9], "<row>", "expected one JSON object per line, got invalid JSON"),
    ("a JSON list", "[1, 2]", "<row>", "expected a JSON object, got a JSON list"),
    ("missing video", row(id="b", video_path="clips/gone.mp4"), "video_path", "expected an existing video file"),
    ("duplicate id", row(video_path="clips/000018_s0.mp4"), "id",
     "expected an id used by no other row, got \"train-000017-scene\", already the id of line 1"),
]


@pytest.mark.parametrize("case, line, field, message", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_is_one_line_naming_file_line_and_field(root, case, line, field, message):
    path = write_lines(root / "m.jsonl", [AUTHORS_ROW, "", line])
    with pytest.raises(ValueError) as error:
        read_manifest(path)
    text = str(error.value)
    assert text.startswith(f"{path}:3: {field}: ") and message in text and "\n" not in text


def test_invalid_utf8_is_reported_with_its_line(root):
    path = root / "m.jsonl"
    path.write_bytes(json.dumps(AUTHORS_ROW).encode() + b"\n{\"id\": \"caf\xe9\"}\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: <row>: expected UTF-8 text, got an undecodable byte at "
                                         r"column 12$"):
        read_manifest(path)


def test_require_targets_refuses_rows_the_teacher_has_not_filled(root):
    path = write_lines(root / "m.jsonl", [AUTHORS_ROW, row(id="b", target_text=DROP), row(id="c", target_text="")])
    assert len(read_manifest(path).rows) == 3
    rows, bad = read_manifest(path, require_targets=True, skip_bad_rows=True)
    assert [r.id for r in rows] == ["train-000017-scene"]
    assert [(b.line, b.field) for b in bad] == [(2, "target_text"), (3, "target_text")]


def test_skip_bad_rows_keeps_the_good_rows_and_lists_the_bad(root):
    lines = [AUTHORS_ROW, "{oops", row(id="b", video_path="clips/000018_s0.mp4"), row(id=3),
             row(id="c", video_path="clips/missing.mp4"), row(id="b"), row(id="d")]
    path = write_lines(root / "m.jsonl", lines)
    rows, bad = read_manifest(path, skip_bad_rows=True)
    assert [r.id for r in rows] == ["train-000017-scene", "b", "d"]
    assert [(b.line, b.field) for b in bad] == [(2, "<row>"), (4, "id"), (5, "video_path"), (6, "id")]
    assert str(bad[3]).startswith(f"{path}:6: id: expected an id used by no other row, got \"b\", already the id "
                                  "of line 3")


def test_missing_and_empty_manifests(root):
    with pytest.raises(ValueError, match=r"^manifest: expected an existing JSONL file, got '.*nope\.jsonl'"):
        read_manifest(root / "nope.jsonl")
    with pytest.raises(ValueError, match=r"^manifest: expected at least one row, got '.*empty\.jsonl', which has"):
        read_manifest(write_lines(root / "empty.jsonl", ["", "  "]))
    with pytest.raises(ValueError, match=r"^data_root: expected an existing folder"):
        read_manifest(write_lines(root / "m.jsonl", [AUTHORS_ROW]), data_root=root / "absent")


def test_a_crash_while_writing_leaves_the_old_manifest_whole(root, monkeypatch):
    path = root / "out.jsonl"
    old = [ManifestRow(id="old", video_path="a.mp4", prompt="Q?")]
    write_manifest(old, path)
    before = path.read_text()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(manifest_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(old + [ManifestRow(id="new", video_path="b.mp4", prompt="Q?")], path)
    assert path.read_text() == before and sorted(os.listdir(root)) == ["clips", "out.jsonl"]
