"""A tiny training world for the trainer tests: clips with questions and targets, a tiny VLM on disk,
and a `TrainConfig` sized to run a few steps in seconds on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import psutil

from v2l_fast.testing import write_test_video
from v2l_fast.train.config import TrainConfig
from v2l_fast.vlm.factory import random_smolvlm, tiny_smolvlm_tokenizer

ANSWERS = ["a red circle", "two squares", "it moves left", "nothing moves", "blue", "three shapes"]


def write_clips(root, *, clips: int = 6, questions: int = 2, split: str = "train", seed: int = 0) -> str:
    """``clips`` short random videos under ``root/videos`` and a manifest ``root/{split}.jsonl``
    with ``questions`` rows (prompt + target) per clip, interleaved; returns the manifest path."""
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    rows = []
    for c in range(clips):
        name = f"{split}-{c}.mp4"
        write_test_video(os.path.join(root, "videos", name), num_frames=3 + c % 3, fps=2, seed=seed + c)
        for q in range(questions):
            rows.append((q, {"id": f"{split}-{c}-q{q}", "video_path": f"videos/{name}",
                             "prompt": f"Question {q} about clip {c}?",
                             "target_text": ANSWERS[(c + q) % len(ANSWERS)], "split": split}))
    path = os.path.join(root, f"{split}.jsonl")
    with open(path, "w") as f:
        for _, row in sorted(rows, key=lambda r: r[0]):
            f.write(json.dumps(row) + "\n")
    return path


def save_tiny_vlm(directory, seed: int = 0) -> str:
    """A tiny random SmolVLM2 and its tokenizer saved as a model directory (what ``--vlm`` takes)."""
    model = random_smolvlm("tiny", seed=seed)
    model.save_pretrained(directory)
    tiny_smolvlm_tokenizer(model.config.text_config.vocab_size).save_pretrained(directory)
    return str(directory)


def tiny_config(root, **overrides) -> TrainConfig:
    """A few-step run over ``root/train.jsonl`` (and ``root/val.jsonl`` when present) with a small
    hypernetwork, no workers and no progress bar, in fp32 on every CPU (``bf16`` would autocast
    on one with AMX: the tests that compare with fp32 computations apart would then depend on the
    machine; test_train_precision.py covers bf16); ``overrides`` replace any setting."""
    val = os.path.join(root, "val.jsonl")
    settings = dict(train_manifest=os.path.join(root, "train.jsonl"),
                    val_manifest=val if os.path.isfile(val) else None, out_dir=os.path.join(root, "run"),
                    rank=4, latent_size=32, num_latent_queries=4, num_blocks=1, max_frames=2, lr=3e-3,
                    warmup_ratio=0.25, max_steps=6, videos_per_device=2, questions_per_video=2, grad_accum=2,
                    eval_every=3, save_every=2, keep_last=2, num_workers=0, progress=False, seed=7, bf16=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def killed_after_step_3_then_resumed(monkeypatch, config: TrainConfig, vlm):
    """Run ``config`` until its third step is done, interrupt it there (its last checkpoint is
    step 2), then start it again; returns the second run's `TrainResult`."""
    import pytest

    from v2l_fast.train.trainer import Trainer, train

    step = Trainer.train_step

    def dies_after_step_3(self, micros):
        out = step(self, micros)
        if self.step == 3:
            raise KeyboardInterrupt
        return out

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", dies_after_step_3)
        with pytest.raises(KeyboardInterrupt):
            train(config, vlm=vlm)
    return train(config, vlm=vlm)


def write_train_and_val(root) -> None:
    """The world of the training-loop tests: 5 training clips × 3 questions and 2 validation
    clips × 2 questions under ``root``."""
    write_clips(root, clips=5, questions=3)
    write_clips(root, clips=2, questions=2, split="val", seed=50)


def read_metrics(out_dir) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_v2l_fast(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *argv`` (``-m v2l_fast …`` or ``-m torch.distributed.run … -m v2l_fast …``) outside
    any torchrun world of the caller; fails the test with its stderr when it exits non-zero.

    On a hang past ``timeout`` the process and its descendants (torchrun starts each worker in a
    session of its own) get SIGABRT with ``PYTHONFAULTHANDLER`` set, so each prints the Python
    stack of every thread where it was stuck, then SIGKILL: the failure shows where the run hung
    and leaves no orphaned worker behind.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONFAULTHANDLER"] = "1"
    with subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            for proc in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGABRT)
            _, alive = psutil.wait_procs(tree, timeout=10)
            for proc in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            stdout, stderr = process.communicate()
            raise AssertionError(f"{' '.join(argv[:4])} … hung for {timeout} s; where its processes were stuck:\n"
                                 f"{stdout[-2000:]}\n{stderr[-10000:]}") from None
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
