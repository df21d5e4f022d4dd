"""Denormals flushed to zero during CPU training, and the previous mode restored."""

from __future__ import annotations

import pytest
import torch

from v2l_fast.train.denormals import denormals_flushed, flush_denormals

DENORMAL = 1e-40  # below fp32's smallest normal, 1.2e-38


@pytest.mark.parametrize("before", [False, True])
def test_the_block_flushes_denormals_and_the_mode_before_it_comes_back(before):
    torch.set_flush_denormal(before)
    try:
        with flush_denormals():
            assert denormals_flushed()
            assert torch.tensor([DENORMAL]).mul(1.0).item() == 0.0
            assert torch.tensor([2e-38]).mul(1.0).item() > 0  # normal floats are untouched
        assert denormals_flushed() == before
        with pytest.raises(RuntimeError), flush_denormals():
            raise RuntimeError("a failing step")
        assert denormals_flushed() == before
    finally:
        torch.set_flush_denormal(False)
    assert torch.tensor([DENORMAL]).mul(1.0).item() > 0


def test_training_loops_run_flushed(monkeypatch, tmp_path):
    from v2l_fast.data.synthetic import generate_world
    from v2l_fast.train import toy_vlm

    seen = []
    loss = toy_vlm.in_context_loss

    def recording_loss(*args, **kwargs):
        seen.append(denormals_flushed())
        return loss(*args, **kwargs)

    monkeypatch.setattr(toy_vlm, "in_context_loss", recording_loss)
    generate_world(tmp_path / "world", num_train=2, num_val=1, num_heldout=0, seed=1, progress=False)
    toy_vlm.train_toy_vlm(tmp_path / "world", tmp_path / "vlm", steps=2, batch_videos=1, progress=False)
    assert seen == [True, True] and not denormals_flushed()


def test_the_hypernetwork_trainer_runs_flushed(monkeypatch, tmp_path):
    from train_world import tiny_config, write_train_and_val

    from v2l_fast.train import trainer as trainer_module
    from v2l_fast.vlm.factory import tiny_vlm

    seen = []
    step = trainer_module.Trainer.train_step

    def recording_step(self, micros):
        seen.append(denormals_flushed())
        return step(self, micros)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", recording_step)
    write_train_and_val(tmp_path)
    trainer_module.train(tiny_config(tmp_path, out_dir=str(tmp_path / "out"), max_steps=2), vlm=tiny_vlm(seed=0))
    assert seen == [True, True] and not denormals_flushed()
