"""The toy VLM of the toy-scale replication: in-context rows, loss, training run, saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from v2l_fast.data.synthetic import generate_world
from v2l_fast.train.objective import IGNORE
from v2l_fast.train.teacher import teacher_prompt
from v2l_fast.train.toy_vlm import (
    TOY_INFO,
    build_toy_vlm,
    first_word,
    in_context_accuracy,
    in_context_batch,
    in_context_loss,
    load_questions,
    save_toy_vlm,
    train_toy_vlm,
    video_features,
)
from v2l_fast.vlm.features import image_tokens
from v2l_fast.vlm.load import load_smolvlm


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, num_train=4, num_val=2, num_heldout=0, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "a"
    return train_toy_vlm(world, out, steps=3, batch_videos=2, seed=5, progress=False)


def step_batch(vlm, questions):
    rows = [(v, row) for v, (_, group) in enumerate(questions) for row in group]
    return in_context_batch(vlm, [video for video, _ in questions], [[(r.prompt, r.target_text)] for _, r in rows],
                            [v for v, _ in rows])


def packed_batch(vlm, questions):
    return in_context_batch(vlm, [video for video, _ in questions],
                            [[(r.prompt, r.target_text) for r in group] for _, group in questions],
                            list(range(len(questions))))


def test_rows_are_the_teacher_prompt_then_the_answer_turn(world):
    vlm = build_toy_vlm("S", seed=0)
    questions = load_questions(world / "train.jsonl", vlm, limit=2)
    batch = step_batch(vlm, questions)
    video, row = questions[1][0], questions[1][1][0]
    b = len(questions[0][1])  # first row of the second video
    prompt = vlm.tokenizer(teacher_prompt(video, row.prompt, vlm), add_special_tokens=False)["input_ids"]
    assert batch.input_ids[b, :len(prompt)].tolist() == prompt
    assert (batch.labels[b, :len(prompt)] == IGNORE).all()
    answer = batch.labels[b][batch.labels[b] != IGNORE].tolist()
    assert vlm.tokenizer.decode(answer) == f" {row.target_text}<end_of_utterance>\n"
    assert (batch.input_ids[b] == 150).sum() == 8 * vlm.preprocessor.image_seq_len == 8 * 16  # 8 frames, 16 tokens each
    assert batch.row_video.tolist() == [0] * len(questions[0][1]) + [1] * len(questions[1][1])


def test_a_packed_row_holds_every_question_of_its_video_and_labels_only_the_answers(world):
    vlm = build_toy_vlm("S", seed=0)
    questions = load_questions(world / "train.jsonl", vlm, limit=2)
    packed, single = packed_batch(vlm, questions), step_batch(vlm, questions)
    assert packed.row_video.tolist() == [0, 1] and len(packed.input_ids) == 2
    for b, (_, group) in enumerate(questions):
        labelled = packed.labels[b][packed.labels[b] != IGNORE].tolist()
        assert vlm.tokenizer.decode(labelled) == "".join(f" {r.target_text}<end_of_utterance>\n" for r in group)
        assert (packed.input_ids[b] == 150).sum() == 8 * 16  # the video once, for all its questions
        first = single.input_ids[len(questions[0][1]) * b]  # the one-question row of its first question
        n = int(single.attention_mask[len(questions[0][1]) * b].sum())
        assert packed.input_ids[b, :n].tolist() == first[:n].tolist()  # the first turn is the teacher's row
        for r in group[1:]:
            assert vlm.tokenizer.decode(packed.input_ids[b]).count(r.prompt) == 1
    assert packed.attention_mask.sum() < 0.5 * single.attention_mask.sum()


def test_loss_shares_each_videos_tokens_and_equals_the_full_forward(world):
    vlm = build_toy_vlm("S", seed=1)
    batch = packed_batch(vlm, load_questions(world / "train.jsonl", vlm, limit=2))
    ours = in_context_loss(vlm.model, batch)
    logits = vlm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       pixel_values=batch.pixel_values[batch.row_video],
                       pixel_attention_mask=batch.pixel_attention_mask[batch.row_video]).logits.float()
    per_row = [F.cross_entropy(logits[b, :-1][batch.labels[b, 1:] != IGNORE],
                               batch.labels[b, 1:][batch.labels[b, 1:] != IGNORE]) for b in range(len(logits))]
    torch.testing.assert_close(ours, torch.stack(per_row).mean(), rtol=1e-5, atol=1e-5)


def test_video_tokens_made_once_give_the_loss_and_gradients_of_the_tower_run_per_step(world):
    vlm = build_toy_vlm("S", seed=4)
    questions = load_questions(world / "train.jsonl", vlm, limit=3)
    videos = [video for video, _ in questions]
    tokens = video_features(vlm, videos, batch_videos=2)  # batches of 2 and 1: other shapes than the step's
    conversations = [[(r.prompt, r.target_text) for r in group] for _, group in questions]
    per_step = in_context_batch(vlm, videos, conversations, [0, 1, 2])
    cached = in_context_batch(vlm, videos, conversations, [0, 1, 2], features=tokens)
    assert cached.pixel_values is None and [t.shape for t in tokens] == [(len(v.frames) * 16, 64) for v in videos]
    assert torch.equal(cached.input_ids, per_step.input_ids) and torch.equal(cached.labels, per_step.labels)
    decoder = [p for name, p in vlm.model.named_parameters() if "text_model" in name or "lm_head" in name]
    losses, grads = [], []
    for batch in (per_step, cached):
        loss = in_context_loss(vlm.model, batch)
        grads.append(torch.autograd.grad(loss, decoder))
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^features: expected one tensor per video \(3 videos\), got 2 tensors$"):
        in_context_batch(vlm, videos, conversations, [0, 1, 2], features=tokens[:2])


def test_loss_goes_down_on_a_fixed_batch(world):
    vlm = build_toy_vlm("S", seed=2)
    vlm.model.train()
    batch = step_batch(vlm, load_questions(world / "train.jsonl", vlm, limit=2))
    optimizer = torch.optim.AdamW(vlm.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = in_context_loss(vlm.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.75 * losses[0], losses


def test_saved_model_loads_and_answers_as_when_it_was_saved(world, trained):
    info = json.loads((Path(trained) / TOY_INFO).read_text())
    vlm = load_smolvlm(trained, dtype=torch.float32)
    assert vlm.preprocessor == build_toy_vlm("S").preprocessor
    again = in_context_accuracy(vlm, world / "val.jsonl")
    assert again == info["val_accuracy"]
    assert again["n"] == (world / "val.jsonl").read_text().count('"task_type": "qa"')
    metrics = [json.loads(line) for line in (Path(trained) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 3 and metrics[-1]["val_accuracy"] == again


def test_the_default_is_the_word_tokenizer_and_char_still_trains_and_loads(world, trained, tmp_path):
    word = load_smolvlm(trained, dtype=torch.float32)
    assert json.loads((Path(trained) / TOY_INFO).read_text())["tokenizer"] == "word"
    assert len(word.tokenizer) == word.model.config.text_config.vocab_size > 160
    char_dir = train_toy_vlm(world, tmp_path / "char", steps=1, batch_videos=2, seed=5, tokenizer="char",
                             progress=False)
    char = load_smolvlm(char_dir, dtype=torch.float32)
    assert len(char.tokenizer) == char.model.config.text_config.vocab_size == 160
    assert char.model.config.image_token_id == word.model.config.image_token_id == 150
    info = json.loads((Path(char_dir) / TOY_INFO).read_text())
    assert info["tokenizer"] == "char" and in_context_accuracy(char, world / "val.jsonl") == info["val_accuracy"]


def test_a_run_is_a_function_of_its_seed(world, trained, tmp_path):
    same = train_toy_vlm(world, tmp_path / "b", steps=3, batch_videos=2, seed=5, progress=False)
    other = train_toy_vlm(world, tmp_path / "c", steps=3, batch_videos=2, seed=6, progress=False)
    first, second, third = (load_file(f"{path}/model.safetensors") for path in (trained, same, other))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_first_word_ignores_case_punctuation_and_what_follows():
    assert first_word(" Red. It is red") == "red"
    assert first_word("") == ""


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=0), r"^steps: expected an int >= 1, got 0$"),
    (dict(batch_videos=2.0), r"^batch_videos: expected an int >= 1, got 2.0$"),
    (dict(lr=-1.0), r"^lr: expected a number > 0, got -1.0$"),
    (dict(warmup_ratio=1.0), r"^warmup_ratio: expected a number in \[0, 1\), got 1.0$"),
    (dict(size="XL"), r"^size: expected one of \['M', 'S'\], got 'XL'$"),
    (dict(device="gpu0"), r"^device: expected a torch device"),
    (dict(tokenizer="bpe"), r"^tokenizer: expected one of \['word', 'char'\], got 'bpe'$"),
    (dict(tokens_per_frame=8), r"^tokens_per_frame: expected one of \[4, 16, 64\], got 8$"),
])
def test_bad_arguments_fail_in_one_line(world, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_toy_vlm(world, tmp_path / "out", **{"steps": 1, **overrides}, progress=False)


def test_a_folder_without_a_world_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^world_dir: expected a synthetic world folder with train.jsonl"):
        train_toy_vlm(tmp_path, tmp_path / "out", steps=1, progress=False)


@pytest.mark.parametrize("tokens", [4, 16, 64])
def test_tokens_per_frame_sets_the_pixel_shuffle_and_survives_a_reload(tokens, tmp_path):
    vlm = build_toy_vlm("S", tokens_per_frame=tokens)
    assert vlm.preprocessor.image_seq_len == tokens
    save_toy_vlm(vlm, tmp_path / "m")
    again = load_smolvlm(tmp_path / "m", dtype=torch.float32)
    assert again.preprocessor == vlm.preprocessor
    assert again.preprocessor.longest_edge == again.preprocessor.max_image_size == 64  # no 384-px detour
    pixels = torch.rand(1, 8, 3, 64, 64)  # (all-zero frames would be dropped as padding)
    features = image_tokens(again.model, pixels, torch.ones(1, 8, 64, 64, dtype=torch.bool))
    assert [f.shape[0] for f in features] == [8 * tokens]


@pytest.mark.parametrize("flag", ["blind", "captions"])
def test_blind_rows_and_captions_are_trained_on_when_asked(world, trained, tmp_path, flag):
    """Turning either kind of extra row on changes what a run learns (the default has both off)."""
    with_rows = train_toy_vlm(world, tmp_path / flag, steps=3, batch_videos=2, seed=5, progress=False, **{flag: True})
    info = json.loads((Path(with_rows) / TOY_INFO).read_text())
    assert info[flag] is True and json.loads((Path(trained) / TOY_INFO).read_text())[flag] is False
    on, off = load_file(f"{with_rows}/model.safetensors"), load_file(f"{trained}/model.safetensors")
    assert not all(torch.equal(on[k], off[k]) for k in on)
