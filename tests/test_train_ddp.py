"""DDP: ``torchrun --nproc-per-node 2 -m v2l_fast train …`` on the CPU (gloo), and the same command as
two nodes (``--nnodes 2``, two torchrun agents at one rendezvous), follow the loss curve of one
process with the same global batch, within fp32 tolerance, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes() -> list[list[str]]:
    """Two torchrun agents of one process each meeting at a c10d rendezvous on loopback: the launch
    of two hosts sharing a file system, on one machine."""
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test"]
    return [rendezvous, rendezvous]


# torchrun layouts of 2 ranks of 1 video each: each launcher's torchrun flags
LAYOUTS = {"2 processes": lambda: [["--standalone", "--nproc-per-node", "2"]], "2 nodes": two_nodes}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run in each torchrun layout of 2 ranks × 1 video, and as one process of 2 videos:
    (root, {layout: the launches' CompletedProcess list}, the single process's)."""
    root = tmp_path_factory.mktemp("ddp")
    # 3 questions per clip cut into items of 2 + 1 rows: the ranks' shards hold unequal row counts
    write_train_and_val(root)
    save_tiny_vlm(root / "vlm")
    launched = {}
    for layout, launchers in LAYOUTS.items():
        launched[layout] = run_v2l_fast(*[
            ["-m", "torch.distributed.run", *launcher, "-m", "v2l_fast", *settings(root), "--videos-per-device", "1",
             "--out-dir", str(root / layout)] for launcher in launchers()])
    one, = run_v2l_fast(["-m", "v2l_fast", *settings(root), "--videos-per-device", "2", "--out-dir", str(root / "one")])
    return root, launched, one


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torchrun_of_two_cpu_ranks_trains_and_only_rank_0_writes(runs, layout):
    root, launched, _ = runs
    stdout = "".join(done.stdout for done in launched[layout])
    summaries = [line for line in stdout.splitlines() if line.startswith("v2l-fast train:")]
    assert len(summaries) == 1 and f"step {STEPS}/{STEPS}" in summaries[0], stdout
    out = root / layout
    assert sorted(os.listdir(out)) == ["best", "checkpoints", "metrics.jsonl"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002", "step-00000004"]
    with open(out / "checkpoints" / "step-00000004" / "state.json") as f:
        state = json.load(f)
    assert state["world_size"] == 2 and state["global_batch_videos"] == 4 and state["data_position"] == 4 * STEPS
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == [1, 2, 2, 3, 4, 4], "each step logged once (rank 0), evaluations at 2 and 4"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_follow_the_loss_curve_of_one_process_with_the_same_global_batch(runs, layout):
    root, _, _ = runs
    two, one = read_metrics(root / layout), read_metrics(root / "one")
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    for a, b in zip(two, one):
        for key in ("loss", "val_ce", "grad_norm", "lr"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a, b)
    weights_two = load_file(root / layout / "checkpoints" / "step-00000004" / "hypernet" / "model.safetensors")
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
        run_v2l_fast(["-c", HUNG_PARENT_AND_CHILD], ["-c", "print('a node that ends')"], timeout=3)
    for function in ("stuck_agent", "stuck_worker"):
        assert f"in {function}" in str(failure.value), str(failure.value)
    left = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before and "stuck_worker" in
            " ".join(p.info["cmdline"] or [])]
    assert not left, left
