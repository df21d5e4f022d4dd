"""DDP: ``torchrun --nproc-per-node 2 -m v2l_fast train …`` on the CPU (gloo) follows the loss curve of
one process with the same global batch, within fp32 tolerance, and only rank 0 writes."""

from __future__ import annotations

import json
import os

import psutil
import pytest
from safetensors.torch import load_file
from train_world import read_metrics, run_v2l_fast, save_tiny_vlm, write_train_and_val

from v2l_fast.testing import assert_rel_close

STEPS = 4


def settings(root) -> list[str]:
    return ["train", "--vlm", str(root / "vlm"), "--train-manifest", str(root / "train.jsonl"),
            "--val-manifest", str(root / "val.jsonl"), "--rank", "4", "--latent-size", "32",
            "--num-latent-queries", "4", "--num-blocks", "1", "--max-frames", "2", "--lr", "3e-3",
            "--warmup-ratio", "0.25", "--max-steps", str(STEPS), "--questions-per-video", "2", "--grad-accum", "2",
            "--eval-every", "2", "--save-every", "2", "--num-workers", "0", "--no-progress", "--seed", "7",
            "--device", "cpu", "--no-bf16"]  # fp32 tolerance: on an AMX CPU bf16 shards round apart


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run as two CPU processes of 1 video each, and as one process of 2 videos."""
    root = tmp_path_factory.mktemp("ddp")
    # 3 questions per clip cut into items of 2 + 1 rows: the ranks' shards hold unequal row counts
    write_train_and_val(root)
    save_tiny_vlm(root / "vlm")
    two = run_v2l_fast(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "v2l_fast",
               *settings(root), "--videos-per-device", "1", "--out-dir", str(root / "two")])
    one = run_v2l_fast(["-m", "v2l_fast", *settings(root), "--videos-per-device", "2", "--out-dir", str(root / "one")])
    return root, two, one


def test_torchrun_with_two_cpu_processes_trains_and_only_rank_0_writes(runs):
    root, two, _ = runs
    summaries = [line for line in two.stdout.splitlines() if line.startswith("v2l-fast train:")]
    assert len(summaries) == 1 and f"step {STEPS}/{STEPS}" in summaries[0], two.stdout
    assert sorted(os.listdir(root / "two")) == ["best", "checkpoints", "metrics.jsonl"]
    assert sorted(os.listdir(root / "two" / "checkpoints")) == ["step-00000002", "step-00000004"]
    with open(root / "two" / "checkpoints" / "step-00000004" / "state.json") as f:
        state = json.load(f)
    assert state["world_size"] == 2 and state["global_batch_videos"] == 4 and state["data_position"] == 4 * STEPS
    steps = [r["step"] for r in read_metrics(root / "two")]
    assert steps == [1, 2, 2, 3, 4, 4], "each step logged once (rank 0), evaluations at 2 and 4"


def test_two_processes_follow_the_loss_curve_of_one_with_the_same_global_batch(runs):
    root, _, _ = runs
    two, one = read_metrics(root / "two"), read_metrics(root / "one")
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    for a, b in zip(two, one):
        for key in ("loss", "val_ce", "grad_norm", "lr"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a, b)
    weights_two = load_file(root / "two" / "checkpoints" / "step-00000004" / "hypernet" / "model.safetensors")
    weights_one = load_file(root / "one" / "checkpoints" / "step-00000004" / "hypernet" / "model.safetensors")
    for key, value in weights_one.items():
        assert_rel_close(weights_two[key], value)


HUNG_PARENT_AND_CHILD = """
import subprocess, sys, time
# a child in a session of its own, as torchrun starts its workers
subprocess.Popen([sys.executable, "-c", "import time\\ndef stuck_worker():\\n    time.sleep(600)\\nstuck_worker()"],
                 start_new_session=True)
def stuck_agent():
    time.sleep(600)
stuck_agent()
"""


def test_a_hung_run_fails_with_where_each_process_was_stuck_and_leaves_none_behind():
    before = {p.pid for p in psutil.process_iter()}
    with pytest.raises(AssertionError, match="hung for 3 s") as failure:
        run_v2l_fast(["-c", HUNG_PARENT_AND_CHILD], timeout=3)
    for function in ("stuck_agent", "stuck_worker"):
        assert f"in {function}" in str(failure.value), str(failure.value)
    left = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before and "stuck_worker" in
            " ".join(p.info["cmdline"] or [])]
    assert not left, left
