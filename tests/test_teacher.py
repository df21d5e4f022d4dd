"""Teacher targets: the VLM's greedy answers with the video in context, batched like one by one; a
run killed at any point and restarted ends with every row exactly once, in input order, equal to
an uninterrupted run; bad input is one line naming the file and the field (API and CLI)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from v2l_fast.cli import main
from v2l_fast.data import manifest as manifest_module
from v2l_fast.data.manifest import read_manifest
from v2l_fast.testing import write_test_video
from v2l_fast.train.teacher import EMPTY_ANSWER, make_teacher_targets, partial_path, teacher_prompt
from v2l_fast.vlm.factory import tiny_smolvlm_tokenizer, tiny_vlm
from v2l_fast.vlm.features import inner_model
from v2l_fast.vlm.video import VideoError, read_video

MAX_NEW_TOKENS = 6
# (id, clip, prompt): three clips, seven rows, the clips interleaved
ROWS = [("r0", 0, "Describe this scene."), ("r1", 1, "What moves?"), ("r2", 0, "Write a short summary of this scene."),
        ("r3", 2, "Which colour is first?"), ("r4", 1, "Summarize this video in 1-3 sentences."),
        ("r5", 2, "Is it day?"), ("r6", 0, "Anything else?")]


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(seed=4, max_frames=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three clips under ``clips/`` and the input manifest ``in.jsonl`` with relative paths."""
    root = tmp_path_factory.mktemp("teacher")
    (root / "clips").mkdir()
    for clip in range(3):
        write_test_video(root / "clips" / f"c{clip}.mp4", num_frames=4 + 2 * clip, fps=2, seed=clip)
    write_manifest_lines(root / "in.jsonl", [
        {"id": i, "video_path": f"clips/c{c}.mp4", "task_type": "scene", "prompt": p, "dataset": "test",
         "split": "train", "metadata": {"clip": c}} for i, c, p in ROWS])
    return root


@pytest.fixture(scope="module")
def world(folder):
    """The input manifest with absolute video paths (outputs anywhere hold the same lines)."""
    rows = [dict(row, video_path=str(folder / row["video_path"])) for row in lines_of(folder / "in.jsonl")]
    return write_manifest_lines(folder / "absolute.jsonl", rows)


def write_manifest_lines(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


def teach(world, out, vlm, **kwargs):
    kwargs = dict(vlm=vlm, batch_size=3, max_new_tokens=MAX_NEW_TOKENS, max_frames=3, progress=False) | kwargs
    return make_teacher_targets(world, out, **kwargs)


def lines_of(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(world, vlm, folder):
    """An uninterrupted run's output lines."""
    teach(world, folder / "reference.jsonl", vlm)
    return lines_of(folder / "reference.jsonl")


def test_targets_are_the_greedy_answers_with_the_video_in_context(world, vlm, folder, tmp_path, reference):
    assert [row["id"] for row in reference] == [r[0] for r in ROWS]
    # one row by hand: [video, prompt] with the generation prompt, greedy
    video = read_video(folder / "clips" / "c1.mp4", max_frames=3)
    text = teacher_prompt(video, "What moves?", vlm)
    assert text.startswith("<|im_start|>User: You are provided the following series of")
    assert text.endswith("What moves?<end_of_utterance>\nAssistant:")
    ids = torch.tensor([vlm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    pixels = vlm.preprocessor.pixel_values(video)[None]
    out = vlm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=2)
    expected = vlm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() or EMPTY_ANSWER
    assert reference[1]["target_text"] == expected
    assert reference[1]["metadata"] == {"clip": 1, "teacher_model": "SmolVLMForConditionalGeneration",
                                        "teacher_generated": True, "teacher_prompt": "What moves?",
                                        "teacher_max_new_tokens": MAX_NEW_TOKENS}
    # left-padded batches answer as one row at a time; the result is a valid training manifest
    teach(world, tmp_path / "one.jsonl", vlm, batch_size=1)
    assert lines_of(tmp_path / "one.jsonl") == reference
    assert len(read_manifest(folder / "reference.jsonl", require_targets=True).rows) == len(ROWS)
    assert not os.path.exists(partial_path(folder / "reference.jsonl"))


def test_a_videos_questions_share_one_pass_of_the_vision_tower(world, vlm, folder, tmp_path, reference):
    """Seven rows of three clips in one batch: the tower sees each clip's frames once (not once per
    row), and the answers are those of batches of three (the reference) and of the model's own
    per-row pixels (the first test)."""
    seen = []

    def count_images(module, args, kwargs):
        seen.append((kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]).shape[0])

    clip_frames = [vlm.preprocessor.pixel_values(read_video(folder / "clips" / f"c{c}.mp4", max_frames=3)).shape[0]
                   for c in range(3)]
    handle = inner_model(vlm.model).vision_model.register_forward_pre_hook(count_images, with_kwargs=True)
    try:
        teach(world, tmp_path / "one_batch.jsonl", vlm, batch_size=len(ROWS))
    finally:
        handle.remove()
    assert seen == [sum(clip_frames)], (seen, clip_frames)
    assert lines_of(tmp_path / "one_batch.jsonl") == reference


def test_an_empty_answer_becomes_unable_to_determine(world, vlm, tmp_path, monkeypatch):
    def only_eos(input_ids, **kwargs):
        return torch.cat([input_ids, torch.full((len(input_ids), 1), 2)], dim=1)

    monkeypatch.setattr(vlm.model, "generate", only_eos)
    teach(world, tmp_path / "out.jsonl", vlm)
    assert {row["target_text"] for row in lines_of(tmp_path / "out.jsonl")} == {EMPTY_ANSWER}


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way may catch it."""


def kill_after(monkeypatch, target, name, calls: int):
    """Make ``target.name`` die on call number ``calls + 1``."""
    real, count = getattr(target, name), [0]

    def dying(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, dying)


@pytest.mark.parametrize("batches_done", [0, 1, 2])
def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(world, vlm, tmp_path, reference, monkeypatch,
                                                                   batches_done):
    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as patch:
        kill_after(patch, vlm.model, "generate", batches_done)
        with pytest.raises(Killed):
            teach(world, out, vlm)
    assert not out.exists()  # never a half-written manifest
    assert [row["id"] for row in lines_of(partial_path(out))] == [r[0] for r in ROWS[:3 * batches_done]]
    calls = []
    with monkeypatch.context() as patch:
        real = vlm.model.generate
        patch.setattr(vlm.model, "generate", lambda **kw: calls.append(len(kw["input_ids"])) or real(**kw))
        report = teach(world, out, vlm)
    assert sum(calls) == len(ROWS) - 3 * batches_done  # the finished rows were not answered again
    assert (report.written, report.resumed, report.skipped) == (len(ROWS), 3 * batches_done, [])
    assert lines_of(out) == reference and not os.path.exists(partial_path(out))


def test_a_kill_while_writing_the_manifest_resumes_without_generating(world, vlm, tmp_path, reference, monkeypatch):
    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as patch:
        kill_after(patch, manifest_module.os, "replace", 0)
        with pytest.raises(Killed):
            teach(world, out, vlm)
    assert not out.exists() and len(lines_of(partial_path(out))) == len(ROWS)
    monkeypatch.setattr(vlm.model, "generate", lambda **kw: pytest.fail("generated again"))
    assert teach(world, out, vlm).resumed == len(ROWS)
    assert lines_of(out) == reference


def test_a_torn_last_line_of_the_partial_file_is_redone(world, vlm, tmp_path, reference, monkeypatch):
    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as patch:
        kill_after(patch, vlm.model, "generate", 1)
        with pytest.raises(Killed):
            teach(world, out, vlm)
    partial = partial_path(out)
    with open(partial) as f:
        lines = f.readlines()
    with open(partial, "w") as f:  # the kill hit while the third row of the batch was being written
        f.writelines(lines[:2] + [lines[2][:25]])
    report = teach(world, out, vlm)
    assert report.resumed == 2 and lines_of(out) == reference


def test_a_partial_file_of_another_manifest_is_refused(world, vlm, tmp_path):
    out = tmp_path / "out.jsonl"
    write_manifest_lines(partial_path(out), [{"id": "zz", "video_path": "clips/c0.mp4", "prompt": "Q?",
                                              "target_text": "A."}])
    with pytest.raises(ValueError, match=r"out\.jsonl\.partial\.jsonl:1: id: expected a row of the input manifest "
                                         r"\(the partial file of another run\?\), got 'zz', which is not in the input"):
        teach(world, out, vlm)


def test_resuming_with_other_settings_is_refused(world, vlm, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as patch:
        kill_after(patch, vlm.model, "generate", 1)
        with pytest.raises(Killed):
            teach(world, out, vlm)
    with pytest.raises(ValueError, match=r"out\.jsonl\.partial\.jsonl:1: metadata\.teacher_max_new_tokens: expected "
                                         r"9, as this run \(resume with the same settings\), got 6$"):
        teach(world, out, vlm, max_new_tokens=9)
    with pytest.raises(ValueError, match=r"^manifest_out: expected a file in an existing folder, got .*no-such"):
        teach(world, tmp_path / "no-such" / "out.jsonl", vlm)


def test_an_existing_output_is_not_overwritten_unless_asked(world, vlm, tmp_path, reference):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(ValueError, match=r"^manifest_out: expected a file that does not exist yet \(or overwrite\)"):
        teach(world, out, vlm)
    assert out.read_text() == "keep me\n"
    teach(world, out, vlm, overwrite=True)
    assert lines_of(out) == reference


def test_unreadable_videos_stop_the_run_or_are_skipped_and_listed(world, vlm, tmp_path, reference):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    rows = lines_of(world)
    rows.insert(2, {"id": "bad", "video_path": str(corrupt), "prompt": "What?"})
    rows.insert(5, {"id": "gone", "video_path": str(tmp_path / "gone.mp4"), "prompt": "What?"})
    path = write_manifest_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl:6: video_path: expected an existing video file, got "
                                         r"\".*gone\.mp4\""):
        teach(path, tmp_path / "out.jsonl", vlm)
    corrupt_only = write_manifest_lines(tmp_path / "corrupt.jsonl", [row for row in rows if row["id"] != "gone"])
    with pytest.raises(VideoError) as error:
        teach(corrupt_only, tmp_path / "stopped.jsonl", vlm)
    assert re.match(rf"{re.escape(corrupt_only)}:3 \(id 'bad'\): video_path: .*corrupt\.mp4'", str(error.value))
    assert "\n" not in str(error.value)
    report = teach(path, tmp_path / "out.jsonl", vlm, skip_bad_rows=True)
    assert [row["id"] for row in lines_of(tmp_path / "out.jsonl")] == [r[0] for r in ROWS]
    assert lines_of(tmp_path / "out.jsonl") == reference
    assert len(report.skipped) == 2
    assert report.skipped[0].startswith(f"{path}:6: video_path: expected an existing video file")
    assert report.skipped[1].startswith(f"{path}:3 (id 'bad'): video_path: ")


def test_relative_video_paths_follow_the_output_to_another_folder(folder, vlm, tmp_path):
    out = tmp_path / "teacher.jsonl"
    teach(folder / "in.jsonl", out, vlm)
    assert lines_of(out)[0]["video_path"] == os.path.relpath(folder / "clips" / "c0.mp4", tmp_path)
    assert read_manifest(out).rows[0].video_file == str(folder / "clips" / "c0.mp4")
    teach(folder / "in.jsonl", tmp_path / "given-root.jsonl", vlm, data_root=folder)  # kept as written
    assert lines_of(tmp_path / "given-root.jsonl")[0]["video_path"] == "clips/c0.mp4"


@pytest.fixture(scope="module")
def model_dir(vlm, folder):
    """The tiny teacher saved as a model directory, for the command line."""
    path = folder / "vlm"
    vlm.model.save_pretrained(path)
    tiny_smolvlm_tokenizer().save_pretrained(path)
    return path


def test_a_sigkilled_command_resumes_to_the_uninterrupted_result(world, vlm, model_dir, tmp_path):
    """A real kill: SIGKILL the ``v2l-fast teacher`` process once rows are on disk, run it again."""
    out = tmp_path / "out.jsonl"
    argv = ["teacher", world, str(out), "--vlm", str(model_dir), "--batch-size", "1", "--max-new-tokens", "40",
            "--max-frames", "3", "--device", "cpu", "--dtype", "fp32"]
    process = subprocess.Popen([sys.executable, "-m", "v2l_fast", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.exists(partial_path(out)) and os.path.getsize(partial_path(out)) > 0:
                break
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert os.path.getsize(partial_path(out)) > 0 and not out.exists(), "the run ended before it could be killed"
    assert main(argv) == 0
    teach(world, tmp_path / "uninterrupted.jsonl", vlm, max_new_tokens=40, teacher_name=str(model_dir))
    assert lines_of(out) == lines_of(tmp_path / "uninterrupted.jsonl")


def test_cli_writes_targets_and_reports_bad_input_in_one_line(world, folder, vlm, model_dir, tmp_path, capsys):
    common = ("--vlm", str(model_dir), "--batch-size", "3", "--max-new-tokens", str(MAX_NEW_TOKENS),
              "--max-frames", "3", "--device", "cpu", "--dtype", "fp32")
    out = tmp_path / "out.jsonl"
    assert main(["teacher", world, str(out), *common]) == 0
    assert f"wrote {len(ROWS)} rows to {out}" in capsys.readouterr().out
    teach(world, tmp_path / "api.jsonl", vlm, teacher_name=str(model_dir))
    assert lines_of(out) == lines_of(tmp_path / "api.jsonl")

    def bad_input(*argv) -> str:
        code = main(["teacher", *map(str, argv)])
        err = capsys.readouterr().err
        lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
        assert code == 2 and "Traceback" not in err and lines[-1].startswith("v2l-fast teacher: error: "), err
        return lines[-1]

    broken = write_manifest_lines(tmp_path / "broken.jsonl", [lines_of(world)[0], "{not json"])
    assert f"{broken}:2: <row>: expected one JSON object per line" in bad_input(broken, tmp_path / "o.jsonl",
                                                                                 *common)
    (tmp_path / "elsewhere").mkdir()
    assert f"{folder / 'in.jsonl'}:1: video_path: expected an existing video file" in bad_input(
        folder / "in.jsonl", tmp_path / "o.jsonl", *common, "--data-root", tmp_path / "elsewhere")
    llama = tmp_path / "llama"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=160)).save_pretrained(llama)
    assert "name_or_path: expected a SmolVLM2 checkpoint (config model_type 'smolvlm'), got" in bad_input(
        world, tmp_path / "o.jsonl", *common[2:], "--vlm", llama)
