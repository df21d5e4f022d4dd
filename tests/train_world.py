"""A tiny training world for the trainer tests: clips with questions and targets, a tiny VLM on disk,
and a `TrainConfig` sized to run a few steps in seconds on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

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


def run_v2l_fast(*argvs: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """``python *argv`` for each of ``argvs`` (``-m v2l_fast …``, ``-m torch.distributed.run … -m
    v2l_fast …``), all at once (the nodes of one multi-node run), outside any torchrun world of the
    caller; fails the test with a command's stderr when it exits non-zero.

    On a hang past ``timeout`` every process and its descendants (torchrun starts each worker in a
    session of its own) get SIGABRT with ``PYTHONFAULTHANDLER`` set, so each prints the Python
    stack of every thread where it was stuck, then SIGKILL: the failure shows where the run hung
    and leaves no orphaned worker behind.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONFAULTHANDLER"] = "1"
    hung = False
    with contextlib.ExitStack() as stack:
        files = [[stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2)] for _ in argvs]
        processes = [subprocess.Popen([sys.executable, *argv], stdout=out, stderr=err, text=True, env=env)
                     for argv, (out, err) in zip(argvs, files)]
        deadline = time.monotonic() + timeout
        try:
            for process in processes:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            hung = True
            _abort_with_stacks(processes)
        done = []
        for argv, process, (out, err) in zip(argvs, processes, files):
            out.seek(0), err.seek(0)
            done.append(subprocess.CompletedProcess(argv, process.returncode, out.read(), err.read()))
    if hung:
        raise AssertionError(f"hung for {timeout} s; where its processes were stuck:\n" + "\n".join(
            f"$ {' '.join(d.args[:4])} …\n{d.stdout[-2000:]}\n{d.stderr[-10000:]}" for d in done))
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


def _abort_with_stacks(processes: list[subprocess.Popen]) -> None:
    """SIGABRT (stacks printed under ``PYTHONFAULTHANDLER``) to every process of the trees, one at a
    time (a worker shares its parent's stderr: dumps made at once interleave), then SIGKILL."""
    tree = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(process.pid)
            tree += [parent, *parent.children(recursive=True)]
    alive = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGABRT)
            alive += psutil.wait_procs([proc], timeout=10)[1]
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    for process in processes:
        process.wait()
