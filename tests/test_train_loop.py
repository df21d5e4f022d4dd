"""The training loop: a run killed mid-way and resumed ends bit-identical to an uninterrupted one (with
the feature cache), only the hypernetwork learns, the data order, and the settings (file, flags)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_world import killed_after_step_3_then_resumed, read_metrics, tiny_config, write_clips, write_train_and_val

from v2l_fast.cli import main
from v2l_fast.train import trainer as trainer_module
from v2l_fast.train.config import TrainConfig, load_config
from v2l_fast.train.trainer import DataOrder, Trainer, train
from v2l_fast.vlm.factory import tiny_vlm


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_loop")
    write_train_and_val(root)
    return root



def final_weights(out_dir, step=6) -> dict:
    return load_file(f"{out_dir}/checkpoints/step-{step:08d}/hypernet/model.safetensors")


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_a_run_killed_mid_way_and_resumed_ends_bit_identical_to_an_uninterrupted_run(world, monkeypatch,
                                                                                     deterministic):
    vlm = tiny_vlm(seed=0)
    frozen = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    cache = world / "features"
    # questions_per_video 2 < 3 questions: a video's rows come in two items with their own adapters
    whole = tiny_config(world, out_dir=str(world / "whole"), feature_cache=str(cache))
    result = train(whole, vlm=vlm)
    assert result.step == 6 and result.resumed_from is None
    assert all(torch.equal(v, frozen[k]) for k, v in vlm.model.state_dict().items()), "the VLM changed"
    assert not any(p.requires_grad for p in vlm.model.parameters())

    # the same run, killed after step 3 (its last checkpoint is step 2), then started again with
    # DataLoader workers; every video's features now come from the cache the first run wrote
    killed = whole.replace(out_dir=str(world / "killed"), num_workers=2)
    resumed = killed_after_step_3_then_resumed(monkeypatch, killed, vlm)
    assert resumed.resumed_from.endswith("step-00000002") and resumed.step == 6

    a, b = final_weights(whole.out_dir), final_weights(killed.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"
    opt_a = torch.load(f"{whole.out_dir}/checkpoints/step-00000006/trainer.pt", weights_only=True)["optimizer"]
    opt_b = torch.load(f"{killed.out_dir}/checkpoints/step-00000006/trainer.pt", weights_only=True)["optimizer"]
    assert all(torch.equal(opt_a["state"][i]["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"]) for i in opt_a["state"])
    # the metrics log of the resumed run is the uninterrupted one's, each step once
    drop_time = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(whole.out_dir)]
    assert drop_time == [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(killed.out_dir)]
    losses = [r["loss"] for r in read_metrics(whole.out_dir) if "loss" in r]
    val = [r["val_ce"] for r in read_metrics(whole.out_dir) if "val_ce" in r]
    assert [r["step"] for r in read_metrics(whole.out_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < losses[0] and val[-1] < val[0], (losses, val)


def test_the_data_order_is_a_seeded_permutation_per_epoch_split_into_disjoint_rank_shards():
    two = DataOrder(num_items=7, seed=3, videos_per_device=1, world_size=2, grad_accum=2)
    one = DataOrder(num_items=7, seed=3, videos_per_device=2, world_size=1, grad_accum=2)
    assert two.global_batch == one.global_batch == 4
    stream = two.stream(0, 21)
    for epoch in range(3):
        assert sorted(stream[7 * epoch:7 * epoch + 7]) == list(range(7))
    assert stream[:7] != stream[7:14], "every epoch draws a new order"
    for step in range(5):
        for micro in range(2):
            ranks = two.micro_step(step, micro)
            assert [len(r) for r in ranks] == [1, 1] and ranks[0] + ranks[1] == one.micro_step(step, micro)[0]
    again = DataOrder(num_items=7, seed=3, videos_per_device=1, world_size=2, grad_accum=2)
    assert again.stream(13, 8) == stream[13:21], "the order is a function of (seed, position) alone"
    assert DataOrder(7, 4, 1, 2, 2).stream(0, 7) != stream[:7]


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_the_step_weighs_each_rank_by_its_share_of_rows_so_shards_add_up_to_the_whole(world, kl_weight):
    """Items of unequal size (3 questions cut into 2 + 1): the weighted shard losses of a micro-step sum
    to the mean over all its rows, the loss one process holding the whole slice computes — with the
    KL term too (a per-row mean like the CE)."""
    trainer = Trainer(tiny_config(world, out_dir=str(world / f"shares-{kl_weight}"), kl_weight=kl_weight),
                      vlm=tiny_vlm(seed=0))
    sizes = sorted({len(item) for item in trainer.dataset.items})
    assert sizes == [1, 2]
    order = trainer.order.micro_step(0, 0)[0]
    collate = trainer_module._Collate(trainer.vlm.tokenizer, trainer.vlm.preprocessor, trainer.config.instruction,
                                      teacher=kl_weight > 0)
    per_item = []
    with torch.no_grad():  # (a failure inside must not leave grad mode off for the tests after it)
        for index in order:
            terms, rows = trainer._loss(collate([trainer.dataset[index]]), trainer.train_adapters)
            per_item.append((float(terms.loss), rows))
            assert (terms.kl is None) == (kl_weight == 0)
        terms, rows = trainer._loss(collate([trainer.dataset[i] for i in order]), trainer.train_adapters)
    assert rows == sum(n for _, n in per_item)
    assert abs(sum(l * n / rows for l, n in per_item) - float(terms.loss)) < 1e-5


def test_an_unreadable_video_stops_the_run_with_one_line_naming_its_manifest_row(tmp_path):
    write_clips(tmp_path, clips=2, questions=1)
    (tmp_path / "videos" / "train-1.mp4").write_bytes(b"not a video at all")
    config = tiny_config(tmp_path, videos_per_device=2, grad_accum=1, num_workers=1)
    with pytest.raises(ValueError) as error:
        train(config, vlm=tiny_vlm(seed=0))
    message = str(error.value)
    assert "\n" not in message and f"{tmp_path / 'train.jsonl'}:2 (id 'train-1-q0'): video_path:" in message, message


def test_settings_come_from_spec_defaults_then_the_file_then_the_flags(tmp_path):
    spec = TrainConfig()
    assert (spec.lr, spec.weight_decay, spec.betas, spec.eps, spec.warmup_ratio, spec.max_grad_norm, spec.seed,
            spec.kl_weight, spec.kl_temperature, spec.max_frames, spec.bf16) == (
        1e-4, 0.01, (0.9, 0.999), 1e-8, 0.03, 1.0, 42, 0.0, 1.0, 12, True)
    (tmp_path / "run.toml").write_text('lr = 3e-4\nbetas = [0.8, 0.99]\nmax_steps = 50\nbf16 = false\n')
    config = load_config(tmp_path / "run.toml")
    assert (config.lr, config.betas, config.max_steps, config.bf16, config.seed) == (3e-4, (0.8, 0.99), 50, False, 42)
    assert config.warmup_steps == 1
    assert config.replace(lr=None, seed=5).seed == 5 and config.replace(lr=None).lr == 3e-4
    (tmp_path / "run.json").write_text(json.dumps({"lr": 1e-3, "grad_accum": 4}))
    assert load_config(tmp_path / "run.json").grad_accum == 4


@pytest.mark.parametrize("content, fragment", [
    ({"learning_rate": 1e-4}, "run.json: learning_rate: expected one of the training settings"),
    ({"max_steps": "100"}, 'run.json: max_steps: expected an int, got "100"'),
    ({"warmup_ratio": 3}, "run.json: warmup_ratio: expected a fraction in [0, 1], got 3.0"),
    ({"betas": [0.9]}, "run.json: betas: expected two numbers, got [0.9]"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_field(tmp_path, capsys, content, fragment):
    (tmp_path / "run.json").write_text(json.dumps(content))
    code = main(["train", "--config", str(tmp_path / "run.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_a_bad_flag_value_is_one_line_naming_the_flag(capsys):
    code = main(["train", "--lr", "-1", "--max-steps", "5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "v2l-fast train: error: --lr: expected a value > 0, got -1.0", err


def test_help_explains_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for field in TrainConfig.__dataclass_fields__:
        assert f"--{field.replace('_', '-')}" in out
    for text in ("torchrun --nproc-per-node N", "resumes from the latest one exactly", "(default: 0.0001)",
                 "--no-bf16", "spec §7"):
        assert text in out


def test_the_feature_cache_key_changes_with_the_model_and_the_frame_count(world):
    from v2l_fast.train.features_cache import settings_key

    a, b = tiny_vlm(seed=0), tiny_vlm(seed=1)
    same = settings_key(a.model, a.preprocessor, "x")
    assert settings_key(tiny_vlm(seed=0).model, a.preprocessor, "x") == same
    assert settings_key(b.model, a.preprocessor, "x") != same
    assert settings_key(a.model, tiny_vlm(seed=0, max_frames=5).preprocessor, "x") != same
    assert settings_key(a.model, a.preprocessor, "y") != same
