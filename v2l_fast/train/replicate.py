"""The toy-scale replication of the paper's claim, one resumable pipeline (``v2l-fast replicate``).

Five stages, each in its own folder of ``out_dir``, each skipped when its output is complete (so
a run stopped at any point and started again goes on where it was):

1. ``world/`` — `generate_world`: clips of moving shapes with captions and questions
   (train / val / held-out);
2. ``vlm/`` — `train_toy_vlm`: a tiny SmolVLM2 trained from scratch on the training questions
   with the video in its context;
3. ``teacher/train.jsonl`` — `make_teacher_targets`: the frozen toy VLM answers the questions of
   the first ``teacher_clips`` training clips with the video in context, greedily; those answers
   are the hypernetwork's targets (docs/method.md §7: the student imitates the teacher);
4. ``hypernet/`` — `train`: Frames2LoRA learns from the teacher targets, only it learns;
   ``hypernet/best`` (lowest validation CE) is the result;
5. ``report.json`` — `evaluate` on the held-out clips: (a) video in context, (b) adapter only
   with zero visual tokens, (c) neither, (d) agreement of (b) with (a), and the goal check.

`ReplicateSettings` holds every knob; its defaults are the measured recipe (bench/NOTES.md,
"toy replication") sized for 2 CPU cores in 45 minutes. ``timings`` in the report are each
stage's wall seconds (a stage finished by an earlier invocation keeps its recorded time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from v2l_fast.errors import check_int, fail

STAGES = ("world", "vlm", "teacher", "hypernet", "evaluate")
REPORT_FILE = "report.json"
TIMINGS_FILE = "timings.json"
MAY_BE_ZERO = ("vision_warmup_steps",)  # int settings where 0 turns a step off


@dataclass(frozen=True)
class ReplicateSettings:
    """Every setting of a replication run (defaults: the recipe sized for 45 minutes on 2 CPU cores)."""

    # world (v2l_fast.data.synthetic.generate_world)
    train_clips: int = 10000
    val_clips: int = 150
    heldout_clips: int = 150  # 4 questions per clip: 600 held-out questions (the goal needs >= 500)
    seed: int = 0
    heldout_seed: int | None = None
    # toy VLM (v2l_fast.train.toy_vlm.train_toy_vlm)
    vlm_size: str = "S"
    vlm_steps: int = 10000
    vlm_batch_videos: int = 8
    vlm_lr: float = 1e-3
    tokens_per_frame: int = 16
    vision_warmup_steps: int = 1000  # steps pretraining the vision tower on the clips' scene labels first (0: none)
    # teacher targets (v2l_fast.train.teacher.make_teacher_targets)
    teacher_clips: int = 6000  # the hypernetwork's training clips (it sees each ~4 times)
    teacher_batch: int = 32
    teacher_max_new_tokens: int = 8  # the answers are one word and the end of the turn
    # hypernetwork (v2l_fast.train.trainer.train)
    rank: int = 8
    latent_size: int = 128
    num_latent_queries: int = 8
    num_blocks: int = 2
    hypernet_steps: int = 3000
    hypernet_lr: float = 1e-3
    videos_per_step: int = 8
    # evaluation (v2l_fast.train.evaluate.evaluate)
    eval_batch: int = 16

    def __post_init__(self) -> None:
        """Refuse a bad setting before any stage runs (one line naming it)."""
        from v2l_fast.train.toy_vlm import TOKENS_PER_FRAME, TOY_SHAPES

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("seed", "heldout_seed"):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    fail(field.name, "an int >= 0" + (" or None" if field.name == "heldout_seed" else ""), repr(value))
            elif field.name.endswith("_lr"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    fail(field.name, "a number > 0", repr(value))
            elif field.type in ("int", int):
                check_int(field.name, value, 0 if field.name in MAY_BE_ZERO else 1)
        if self.vlm_size not in TOY_SHAPES:
            fail("vlm_size", f"one of {sorted(TOY_SHAPES)}", repr(self.vlm_size))
        if self.tokens_per_frame not in TOKENS_PER_FRAME:
            fail("tokens_per_frame", f"one of {sorted(TOKENS_PER_FRAME)}", repr(self.tokens_per_frame))

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return dataclasses.asdict(self)


# A run of every stage in a few seconds: what the tests and `--quick` use (not a replication).
QUICK = ReplicateSettings(train_clips=12, val_clips=3, heldout_clips=3, vlm_steps=3, vlm_batch_videos=2,
                          vision_warmup_steps=2, teacher_clips=10, teacher_batch=8, teacher_max_new_tokens=8, rank=2,
                          latent_size=32, num_latent_queries=2, num_blocks=1, hypernet_steps=2, videos_per_step=2,
                          eval_batch=4)


def _paths(out_dir: str) -> dict[str, str]:
    return {"world": os.path.join(out_dir, "world"), "vlm": os.path.join(out_dir, "vlm"),
            "teacher": os.path.join(out_dir, "teacher", "train.jsonl"), "hypernet": os.path.join(out_dir, "hypernet"),
            "best": os.path.join(out_dir, "hypernet", "best", "hypernet"), "report": os.path.join(out_dir, REPORT_FILE)}


def vlm_dir(out_dir: str | os.PathLike) -> str:
    """Where a replication run keeps its trained toy VLM (a `load_smolvlm` directory)."""
    return _paths(os.fspath(out_dir))["vlm"]


def hypernet_dir(out_dir: str | os.PathLike) -> str:
    """Where a replication run keeps its best hypernetwork (a `load_frames2lora` directory)."""
    return _paths(os.fspath(out_dir))["best"]


def _done(stage: str, paths: dict[str, str]) -> bool:
    """Whether ``stage``'s output is complete (each stage writes its marker last, atomically)."""
    from v2l_fast.train.toy_vlm import TOY_INFO

    return os.path.isfile({"world": os.path.join(paths["world"], "world.json"),
                           "vlm": os.path.join(paths["vlm"], TOY_INFO),
                           "teacher": paths["teacher"],
                           "hypernet": os.path.join(paths["hypernet"], "done.json"),
                           "evaluate": paths["report"]}[stage])


def replicate(out_dir: str | os.PathLike, settings: ReplicateSettings = ReplicateSettings(), *,
              progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the five stages in ``out_dir``; return the report (`EvalReport.to_json`
    plus ``settings`` and ``timings``), also written to ``out_dir/report.json``.

    A folder holding a run with other settings is refused (``settings.json`` is compared), so
    a resumed run never mixes two recipes.
    """
    if not isinstance(settings, ReplicateSettings):
        fail("settings", "a ReplicateSettings", type(settings).__name__)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _pin_settings(out_dir, settings)
    paths = _paths(out_dir)
    timings_path = os.path.join(out_dir, TIMINGS_FILE)
    timings = _read_json(timings_path) or {}
    for stage in STAGES:
        if _done(stage, paths):
            log(f"replicate: {stage} — done earlier ({timings.get(stage, float('nan')):.0f} s)")
            continue
        log(f"replicate: {stage} …")
        started = time.perf_counter()
        _RUN[stage](paths, settings, progress)
        timings[stage] = round(time.perf_counter() - started, 1)
        _write_json(timings_path, timings)
        log(f"replicate: {stage} — {timings[stage]:.0f} s")
    report = _read_json(paths["report"])
    report["timings"] = dict(timings, total=round(sum(timings[s] for s in STAGES if s in timings), 1))
    _write_json(paths["report"], report)
    return report


def _world(paths, s: ReplicateSettings, progress: bool) -> None:
    from v2l_fast.data.synthetic import generate_world

    generate_world(paths["world"], num_train=s.train_clips, num_val=s.val_clips, num_heldout=s.heldout_clips,
                   seed=s.seed, heldout_seed=s.heldout_seed, progress=progress)


def _vlm(paths, s: ReplicateSettings, progress: bool) -> None:
    from v2l_fast.train.toy_vlm import train_toy_vlm

    train_toy_vlm(paths["world"], paths["vlm"], size=s.vlm_size, steps=s.vlm_steps, batch_videos=s.vlm_batch_videos,
                  lr=s.vlm_lr, seed=s.seed, tokens_per_frame=s.tokens_per_frame,
                  vision_warmup_steps=s.vision_warmup_steps, progress=progress)


def _questions_manifest(world: str, split: str, name: str, *, clips: int | None = None) -> str:
    """``world/name``: the question rows of ``world/split.jsonl`` (of its first ``clips`` clips),
    without the captions (the toy VLM is trained on questions only); beside the videos it names."""
    from v2l_fast.data.manifest import read_manifest, write_manifest

    rows = [row for row in read_manifest(os.path.join(world, f"{split}.jsonl")).rows if row.task_type == "qa"]
    kept = set(list(dict.fromkeys(row.video_path for row in rows))[:clips])
    path = os.path.join(world, name)
    write_manifest([row for row in rows if row.video_path in kept], path)
    return path


def _teacher(paths, s: ReplicateSettings, progress: bool) -> None:
    from v2l_fast.train.teacher import make_teacher_targets
    from v2l_fast.vlm.load import load_smolvlm

    questions = _questions_manifest(paths["world"], "train", "teacher_questions.jsonl", clips=s.teacher_clips)
    os.makedirs(os.path.dirname(paths["teacher"]), exist_ok=True)
    make_teacher_targets(questions, paths["teacher"],
                         vlm=load_smolvlm(paths["vlm"], dtype=torch.float32), batch_size=s.teacher_batch,
                         max_new_tokens=s.teacher_max_new_tokens, teacher_name="toy VLM", progress=progress)


def _hypernet(paths, s: ReplicateSettings, progress: bool) -> None:
    from v2l_fast.train.config import TrainConfig
    from v2l_fast.train.trainer import train

    out = paths["hypernet"]
    val = _questions_manifest(paths["world"], "val", "val_questions.jsonl")
    config = TrainConfig(vlm=paths["vlm"], train_manifest=paths["teacher"], val_manifest=val, out_dir=out,
                         feature_cache=os.path.join(out, "features"), rank=s.rank, latent_size=s.latent_size,
                         num_latent_queries=s.num_latent_queries, num_blocks=s.num_blocks, lr=s.hypernet_lr,
                         warmup_ratio=0.05, max_steps=s.hypernet_steps, videos_per_device=s.videos_per_step,
                         questions_per_video=4, grad_accum=1, seed=s.seed, max_frames=12,
                         eval_every=max(1, s.hypernet_steps // 5), eval_videos=50,
                         save_every=max(1, s.hypernet_steps // 5), keep_last=1, num_workers=0, progress=progress)
    result = train(config)
    _write_json(os.path.join(out, "done.json"), {"step": result.step, "loss": result.loss,
                                                 "best_val_ce": result.best_val_ce})


def _evaluate(paths, s: ReplicateSettings, progress: bool) -> None:
    from v2l_fast.hypernet import load_frames2lora
    from v2l_fast.train.evaluate import evaluate
    from v2l_fast.vlm.load import load_smolvlm

    vlm = load_smolvlm(paths["vlm"], dtype=torch.float32)
    hypernet = load_frames2lora(paths["best"], expect=vlm.model.config)
    report = evaluate(os.path.join(paths["world"], "heldout.jsonl"), vlm=vlm, hypernet=hypernet,
                      batch_size=s.eval_batch, progress=progress)
    _write_json(paths["report"], report.to_json())


_RUN = {"world": _world, "vlm": _vlm, "teacher": _teacher, "hypernet": _hypernet, "evaluate": _evaluate}


def _pin_settings(out_dir: str, settings: ReplicateSettings) -> None:
    path = os.path.join(out_dir, "settings.json")
    saved = _read_json(path)
    if saved is None:
        _write_json(path, settings.to_dict())
    elif saved != json.loads(json.dumps(settings.to_dict())):
        changed = sorted(k for k in settings.to_dict() if saved.get(k) != settings.to_dict()[k])
        fail(f"{path}: {changed[0] if changed else 'settings'}",
             f"the settings of this run ({settings.to_dict().get(changed[0]) if changed else '…'!r}; start "
             "another output folder to change them)", repr(saved.get(changed[0])) if changed else "other keys")


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, data: dict) -> None:
    from v2l_fast.data.manifest import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
