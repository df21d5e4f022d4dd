"""`v2l-fast replicate`: the five stages run, resume and refuse a changed recipe (mechanics only:
the quick settings train for a few steps; the replication itself is measured in bench/NOTES.md)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from v2l_fast.cli import main
from v2l_fast.train.evaluate import MODES, EvalReport
from v2l_fast.train.replicate import QUICK, STAGES, hypernet_dir, replicate, vlm_dir
from v2l_fast.train.toy_vlm import TOY_INFO


@pytest.fixture(scope="module")
def run(quick_replication):
    return quick_replication


def test_every_stage_runs_once_and_the_report_covers_the_heldout_questions(run):
    out, report, lines = run
    assert [line for line in lines if line.endswith("…")] == [f"replicate: {stage} …" for stage in STAGES]
    heldout = (out / "world" / "heldout.jsonl").read_text().count('"task_type": "qa"')
    assert report["n"] == heldout > 0
    assert set(report["accuracy"]) == set(MODES)
    assert set(report["timings"]) == {*STAGES, "total"}
    assert report["timings"]["total"] == pytest.approx(sum(report["timings"][s] for s in STAGES), abs=0.2)
    assert json.loads((out / "report.json").read_text()) == report
    teacher = [json.loads(line) for line in (out / "teacher" / "train.jsonl").read_text().splitlines()]
    world = [json.loads(line) for line in (out / "world" / "train.jsonl").read_text().splitlines()]
    clips = list(dict.fromkeys(row["video_path"] for row in world))[:QUICK.teacher_clips]
    assert QUICK.teacher_clips < QUICK.train_clips
    assert [row["id"] for row in teacher] == [row["id"] for row in world
                                              if row["task_type"] == "qa" and row["video_path"] in clips]
    assert vlm_dir(out) == str(out / "vlm") and (out / "vlm" / TOY_INFO).is_file()
    assert hypernet_dir(out) == str(out / "hypernet" / "best" / "hypernet") and (out / "hypernet" / "best").is_dir()


def test_a_finished_run_started_again_redoes_nothing(run):
    out, report, _ = run
    lines: list[str] = []
    again = replicate(out, QUICK, progress=False, log=lines.append)
    assert all("done earlier" in line for line in lines) and len(lines) == len(STAGES)
    assert again == report


def test_a_stopped_run_resumes_at_the_first_unfinished_stage(run, tmp_path):
    out, _, _ = run
    for stage in ("world", "vlm", "teacher", "hypernet"):  # copy the finished stages, not the evaluation
        src = out / stage
        (tmp_path / stage).symlink_to(src, target_is_directory=True)
    for name in ("settings.json", "timings.json"):
        (tmp_path / name).write_text((out / name).read_text())
    lines: list[str] = []
    report = replicate(tmp_path, QUICK, progress=False, log=lines.append)
    assert [line for line in lines if line.endswith("…")] == ["replicate: evaluate …"]
    assert report["accuracy"] == json.loads((out / "report.json").read_text())["accuracy"]


def test_another_recipe_in_the_same_folder_is_refused(run):
    out, _, _ = run
    with pytest.raises(ValueError, match=r"settings.json: vlm_steps: expected the settings of this run \(4"):
        replicate(out, dataclasses.replace(QUICK, vlm_steps=4), progress=False, log=lambda line: None)


def test_the_command_prints_the_table_and_the_wall_time(run, capsys):
    out, report, _ = run
    assert main(["replicate", str(out), "--quick", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert EvalReport.from_json(report).table() in printed
    assert "wall time: world" in printed and f"{out}/report.json" in printed
    assert main(["replicate", str(out), "--quick", "--vlm-steps", "5"]) == 2
    assert "vlm_steps" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (dict(vlm_steps=0), r"^vlm_steps: expected an int >= 1, got 0$"),
    (dict(heldout_clips=2.5), r"^heldout_clips: expected an int >= 1, got 2.5$"),
    (dict(vlm_lr=0.0), r"^vlm_lr: expected a number > 0, got 0.0$"),
    (dict(seed=-1), r"^seed: expected an int >= 0, got -1$"),
    (dict(heldout_seed=-2), r"^heldout_seed: expected an int >= 0 or None, got -2$"),
    (dict(vlm_size="XL"), r"^vlm_size: expected one of \['M', 'S'\], got 'XL'$"),
    (dict(tokens_per_frame=8), r"^tokens_per_frame: expected one of \[4, 16, 64\], got 8$"),
    (dict(vision_warmup_steps=-1), r"^vision_warmup_steps: expected an int >= 0, got -1$"),
])
def test_a_bad_setting_is_refused_before_any_stage_runs(overrides, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(QUICK, **overrides)
    flag = "--" + next(iter(overrides)).replace("_", "-")
    if isinstance(next(iter(overrides.values())), (int, str)) and "heldout_clips" not in overrides:
        assert main(["replicate", str(tmp_path / "run"), "--quick", flag, str(next(iter(overrides.values())))]) == 2
        assert not (tmp_path / "run" / "world").exists()
