"""Training checkpoints: the layout (keep-last-k, best by validation CE, a hypernetwork that loads on
its own), refusal of a checkpoint of another architecture or run set-up in one line naming the file
and field, partial writes of a killed run, RNG states, and the feature cache's bad files."""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np
import pytest
import torch
from train_world import save_tiny_vlm, write_clips

from v2l_fast.cli import main
from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig, load_frames2lora, save_frames2lora
from v2l_fast.train import checkpoint as ckpt
from v2l_fast.train.features_cache import FeatureCache
from v2l_fast.vlm.factory import random_smolvlm

SMALL = ["--rank", "4", "--latent-size", "32", "--num-latent-queries", "4", "--num-blocks", "1"]


def settings(root, out_dir, *extra) -> list[str]:
    return ["train", "--vlm", str(root / "vlm"), "--train-manifest", str(root / "train.jsonl"),
            "--val-manifest", str(root / "val.jsonl"), "--out-dir", str(out_dir), *SMALL, "--max-frames", "2",
            "--lr", "3e-3", "--max-steps", "4", "--videos-per-device", "2", "--questions-per-video", "2",
            "--grad-accum", "1", "--eval-every", "2", "--save-every", "1", "--keep-last", "2", "--num-workers", "1",
            "--no-progress", "--seed", "3", "--device", "cpu", *extra]


def one_line_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert code == 2 and err[-1].startswith("v2l-fast train: error: ") and "Traceback" not in "".join(err), err
    return err[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run through the CLI (one DataLoader worker), saved every step, keeping the last 2."""
    root = tmp_path_factory.mktemp("train_checkpoint")
    write_clips(root, clips=4, questions=2)
    write_clips(root, clips=2, questions=1, split="val", seed=30)
    save_tiny_vlm(root / "vlm")
    assert main(settings(root, root / "run")) == 0
    return root


def test_a_run_keeps_the_last_k_checkpoints_and_the_best_by_validation_ce(run):
    out = run / "run"
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000003", "step-00000004"]
    for folder in (out / "checkpoints" / "step-00000004", out / "best"):
        assert sorted(os.listdir(folder)) == ["hypernet", "state.json", "train_config.json", "trainer.pt"]
    with open(out / "metrics.jsonl") as f:
        val = {r["step"]: r["val_ce"] for r in map(json.loads, f) if "val_ce" in r}
    assert sorted(val) == [2, 4]
    with open(out / "best" / "state.json") as f:
        best = json.load(f)
    assert best["best_val_ce"] == min(val.values()) and best["step"] == min(val, key=val.get)
    with open(out / "checkpoints" / "step-00000004" / "state.json") as f:
        last = json.load(f)
    assert last["step"] == 4 and last["data_position"] == 8 and last["global_batch_videos"] == 2
    trainer = torch.load(out / "checkpoints" / "step-00000004" / "trainer.pt", weights_only=True)
    assert trainer["scheduler"]["last_epoch"] == 4 and len(trainer["optimizer"]["state"]) > 0
    assert {"python", "numpy", "torch"} <= set(trainer["rng"])
    # the hypernetwork of a checkpoint is a plain save_frames2lora directory (internalize --hypernet)
    hypernet = load_frames2lora(out / "best" / "hypernet")
    assert (hypernet.config.rank, hypernet.config.latent_size) == (4, 32)
    assert hypernet.scaler_B["down_proj"].abs().sum() > 0, "trained: the zero-initialised B scalers moved"


def test_a_finished_run_started_again_resumes_and_has_nothing_left_to_do(run, capsys):
    assert main(settings(run, run / "run")) == 0
    out = capsys.readouterr().out
    assert "step 4/4" in out and f"resumed from {run / 'run' / 'checkpoints' / 'step-00000004'}" in out, out
    assert sorted(os.listdir(run / "run" / "checkpoints")) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("flags, fragment", [
    (["--latent-size", "64"], "hypernet/config.json: config.latent_size: expected 64 (the architecture of this "
                              "run), got 32"),
    (["--num-blocks", "2"], "hypernet/config.json: config.num_blocks: expected 2"),
    (["--rank", "8"], "hypernet/config.json: expected a checkpoint made for this base model, got a checkpoint "
                      "made with another rank: rank (r) is 4 in the checkpoint but 8 expected"),
    (["--grad-accum", "2"], "step-00000004/state.json: global_batch_videos: expected 4"),
    (["--lr", "1e-3"], "step-00000004/train_config.json: lr: expected 0.001"),
])
def test_resuming_with_another_architecture_or_setup_is_one_line_naming_the_file_and_field(
        run, capsys, flags, fragment):
    line = one_line_error(capsys, settings(run, run / "run", *flags))
    assert fragment in line, line
    assert str(run / "run" / "checkpoints" / "step-00000004") in line


def test_a_checkpoint_made_for_another_base_model_is_refused_before_its_weights_are_read(run, capsys):
    out = run / "other_model"
    other = random_smolvlm("tiny", num_hidden_layers=3).config
    hypernet = Frames2LoRA(Frames2LoRAConfig.for_vlm(other, rank=4, latent_size=32, num_latent_queries=4,
                                                     num_blocks=1))
    save_frames2lora(hypernet, out / "checkpoints" / "step-00000002" / "hypernet")
    line = one_line_error(capsys, settings(run, out))
    config = out / "checkpoints" / "step-00000002" / "hypernet" / "config.json"
    assert f"{config}: expected a checkpoint made for this base model" in line
    assert "num_layers (L) is 3 in the checkpoint but 4 expected" in line


def test_a_killed_checkpoint_write_leaves_a_hidden_folder_that_is_ignored_and_removed(tmp_path):
    hypernet = Frames2LoRA(Frames2LoRAConfig(num_layers=2, hidden_size=8, intermediate_size=16, rank=2,
                                             latent_size=16, num_blocks=1, num_latent_queries=2))
    optimizer = torch.optim.AdamW(hypernet.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    contents = dict(hypernet=hypernet, optimizer=optimizer, scheduler=scheduler, state={"step": 1},
                    config_dict={})
    ckpt.save_step(str(tmp_path), 1, 2, **contents)
    torn = tmp_path / "checkpoints" / ".tmp-step-00000002-4242"
    (torn / "hypernet").mkdir(parents=True)
    (torn / "hypernet" / "model.safetensors").write_bytes(b"half a file")
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "step-00000001")
    ckpt.remove_partial_writes(str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000001"]
    for step in (2, 3):
        ckpt.save_step(str(tmp_path), step, 2, **contents)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000002", "step-00000003"]
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)), hypernet)
    assert loaded.state == {"step": 1}


def test_rng_states_round_trip_python_numpy_and_torch():
    saved = ckpt.rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(5)
    ckpt.set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_a_corrupt_cached_feature_file_is_refused_by_name(tmp_path):
    cache = FeatureCache(tmp_path / "cache", "settings")
    features, mask = torch.randn(2, 5, 3), torch.ones(5, dtype=torch.long)
    cache.store("video", features, mask)
    got_features, got_mask = cache.load("video")
    assert torch.equal(got_features, features) and torch.equal(got_mask, mask)
    assert [name for name in os.listdir(cache.folder)] == ["video.safetensors"], "no temporary file left"
    with open(cache.path("video"), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match=r"feature_cache: expected a readable safetensors file .*video\.safetensors"):
        cache.load("video")
