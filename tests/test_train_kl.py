"""Spec §7's optional KL term: `kl_loss` against a brute-force fp64 loop, the teacher's rows and forward
(the raw VLM with the video in context), and training with ``kl_weight`` > 0 (loss = CE + w·KL, logged,
resumed bit-identically, settings checked)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from train_world import (
    killed_after_step_3_then_resumed,
    read_metrics,
    run_v2l_fast,
    save_tiny_vlm,
    tiny_config,
    write_clips,
    write_train_and_val,
)

from v2l_fast.api import pad_id
from v2l_fast.cli import main
from v2l_fast.testing import assert_rel_close, tiny_hypernet, write_test_video
from v2l_fast.train import trainer as trainer_module
from v2l_fast.train.config import TrainConfig
from v2l_fast.train.distill import teacher_answer_logits, teacher_batch
from v2l_fast.train.objective import (
    IGNORE,
    AnswerLogits,
    adapter_loss,
    adapter_objective,
    answer_logits,
    kl_loss,
    student_batch,
)
from v2l_fast.train.teacher import teacher_prompt
from v2l_fast.train.trainer import Trainer, train
from v2l_fast.vlm import LoRAPatch, down_proj_targets
from v2l_fast.vlm.factory import tiny_vlm
from v2l_fast.vlm.video import read_video

PROMPTS = ["What colour is the circle?", "Which way does it move?", "How many shapes are there?"]
TARGETS = ["red", "to the left, slowly", "three"]


class _Identity(torch.nn.Module):
    """A "model" whose LM head is the identity: `answer_logits` then packs given logits."""

    def get_output_embeddings(self):
        return torch.nn.Identity()


def pack(logits: torch.Tensor, labels: torch.Tensor) -> AnswerLogits:
    return answer_logits(_Identity(), logits, labels)


def brute_force_kl(student: torch.Tensor, s_labels: torch.Tensor, teacher: torch.Tensor, t_labels: torch.Tensor,
                   temperature: float) -> float:
    """Spec §7 in fp64, one sample and one token at a time, from full ``[rows, T, V]`` logits."""
    total = 0.0
    for b in range(student.shape[0]):
        s_pos = [t for t in range(student.shape[1] - 1) if s_labels[b, t + 1] != IGNORE]
        t_pos = [t for t in range(teacher.shape[1] - 1) if t_labels[b, t + 1] != IGNORE]
        k = min(len(s_pos), len(t_pos))
        row = 0.0
        for i in range(k):
            log_p = torch.log_softmax(teacher[b, t_pos[i]].double() / temperature, -1)
            log_q = torch.log_softmax(student[b, s_pos[i]].double() / temperature, -1)
            row += float((log_p.exp() * (log_p - log_q)).sum())
        total += row / k
    return total / student.shape[0] * temperature ** 2


def labelled(rows: int, width: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Labels ``[rows, width]``: row b labelled on ``spans[b] = (start, end)``, IGNORE elsewhere."""
    labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    for b, (start, end) in enumerate(spans):
        labels[b, start:end] = torch.arange(start, end) % 7
    return labels


@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
def test_kl_loss_equals_a_brute_force_fp64_loop_with_truncation_and_padding_masked(temperature):
    gen = torch.Generator().manual_seed(0)
    vocab = 11
    # student answers of 3, 5, 2 tokens; teacher answers of 4, 2, 2: rows 0 and 1 are truncated
    s_labels = labelled(3, 9, [(2, 5), (3, 8), (5, 7)])
    t_labels = labelled(3, 12, [(6, 10), (9, 11), (4, 6)])
    student = torch.randn(3, 9, vocab, generator=gen) * 3
    teacher = torch.randn(3, 12, vocab, generator=gen) * 3
    s_answer, t_answer = pack(student, s_labels), pack(teacher, t_labels)
    assert s_answer.counts.tolist() == [3, 5, 2] and t_answer.counts.tolist() == [4, 2, 2]
    want = brute_force_kl(student, s_labels, teacher, t_labels, temperature)
    got = kl_loss(s_answer, t_answer, temperature)
    assert got.dtype == torch.float32 and abs(float(got) - want) <= 1e-5 * abs(want), (float(got), want)
    # the packed-logits form is the same computation
    same = kl_loss(s_answer.logits, t_answer.logits, temperature, student_counts=s_answer.counts,
                   teacher_counts=t_answer.counts)
    assert torch.equal(same, got)
    # prompt and padding positions are never read: garbage there changes nothing
    student_noise, teacher_noise = student.clone(), teacher.clone()
    student_noise[s_labels.roll(-1, 1) == IGNORE] = 1e4
    teacher_noise[t_labels.roll(-1, 1) == IGNORE] = -1e4
    assert torch.equal(kl_loss(pack(student_noise, s_labels), pack(teacher_noise, t_labels), temperature), got)
    # bf16 logits are computed in fp32
    bf16 = kl_loss(pack(student.bfloat16(), s_labels), pack(teacher.bfloat16(), t_labels), temperature)
    assert bf16.dtype == torch.float32


def test_kl_is_zero_for_the_teacher_own_logits_and_positive_otherwise_and_trains_only_the_student():
    gen = torch.Generator().manual_seed(1)
    labels = labelled(2, 8, [(2, 7), (4, 6)])
    logits = torch.randn(2, 8, 13, generator=gen)
    teacher = pack(logits, labels)
    assert float(kl_loss(pack(logits.clone(), labels), teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # the same prefix of a longer student answer: truncation pairs equal tokens, KL still 0
    longer = labelled(2, 8, [(2, 8), (4, 7)])
    assert float(kl_loss(pack(logits.clone(), longer), teacher, 1.0)) == pytest.approx(0.0, abs=1e-6)
    student = (logits + 0.5 * torch.randn(2, 8, 13, generator=gen)).requires_grad_(True)
    teacher_logits = logits.clone().requires_grad_(True)
    kl = kl_loss(pack(student, labels), pack(teacher_logits, labels), 1.0)
    assert float(kl.detach()) > 1e-3
    kl.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher_logits.grad is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), r"^temperature: expected a value > 0, got 0.0$"),
    (dict(temperature=-1.0), r"^temperature: expected a value > 0, got -1.0$"),
    (dict(teacher_counts=torch.tensor([2])), r"^teacher_counts: expected one count per row"),
    (dict(teacher_counts=torch.tensor([2, 1])), r"^teacher_counts: expected counts >= 1 adding up to the 4 packed"),
])
def test_kl_loss_refuses_bad_arguments_with_one_line(kwargs, match):
    args = dict(temperature=1.0, student_counts=torch.tensor([1, 2]), teacher_counts=torch.tensor([3, 1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kl_loss(torch.randn(3, 5), torch.randn(4, 5), args.pop("temperature"), **args)


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(seed=3, max_frames=3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("kl_videos")
    out = []
    for i, frames in enumerate((6, 3)):  # 3 and 2 frames sampled at 1 fps
        write_test_video(root / f"{i}.mp4", num_frames=frames, fps=2, seed=i)
        out.append(read_video(str(root / f"{i}.mp4"), max_frames=3, target_fps=1.0))
    return out


def test_teacher_rows_are_the_teacher_prompt_then_the_answer_labelled(vlm, videos):
    tok = vlm.tokenizer
    batch = teacher_batch(tok, vlm.preprocessor, videos, PROMPTS, TARGETS, [0, 1, 0], pad_token_id=pad_id(tok))
    assert [len(v.frames) for v in videos] == [3, 2]
    assert batch.pixel_values.shape[:2] == (2, 3) and batch.row_video.tolist() == [0, 1, 0]
    assert not batch.pixel_attention_mask[1, 2].any(), "the 2-frame video's padding frame is masked"
    for b, (prompt, target, v) in enumerate(zip(PROMPTS, TARGETS, [0, 1, 0])):
        prompt_ids = tok(teacher_prompt(videos[v], prompt, vlm), add_special_tokens=False)["input_ids"]
        length = int(batch.attention_mask[b].sum())
        assert batch.input_ids[b, :len(prompt_ids)].tolist() == prompt_ids
        assert (batch.labels[b, :len(prompt_ids)] == IGNORE).all() and (batch.labels[b, length:] == IGNORE).all()
        assert (batch.input_ids[b, length:] == pad_id(tok)).all()
        assert tok.decode(batch.labels[b, len(prompt_ids):length]).strip().startswith(target)


def test_teacher_logits_are_the_raw_vlm_forward_with_each_row_holding_its_video(vlm, videos):
    """The vision tower once per video equals the plain forward with the pixels copied per row."""
    tok, model = vlm.tokenizer, vlm.model
    batch = teacher_batch(tok, vlm.preprocessor, videos, PROMPTS, TARGETS, [0, 1, 0], pad_token_id=pad_id(tok))
    got = teacher_answer_logits(model, batch)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=batch.pixel_values[batch.row_video],
                     pixel_attention_mask=batch.pixel_attention_mask[batch.row_video]).logits
    want = pack(full, batch.labels)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.targets, want.targets)
    assert_rel_close(got.logits, want.logits.float(), torch.float32)
    hn = tiny_hypernet(model)
    cfg = model.config.text_config
    out = hn.generate(torch.randn(1, cfg.num_hidden_layers, 5, cfg.hidden_size), None)
    with (LoRAPatch(down_proj_targets(model), out.A.detach(), out.B.detach(), out.alpha),
          pytest.raises(ValueError, match=r"^model: expected the raw VLM for the teacher")):
        teacher_answer_logits(model, batch)


def test_the_objective_is_ce_plus_weighted_kl_from_one_lm_head(vlm, videos):
    tok, model = vlm.tokenizer, vlm.model.requires_grad_(False)
    cfg = model.config.text_config
    hn = tiny_hypernet(model)
    features = torch.randn(2, cfg.num_hidden_layers, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    student = student_batch(tok, PROMPTS, TARGETS, [0, 1, 0])
    teacher = teacher_answer_logits(model, teacher_batch(tok, vlm.preprocessor, videos, PROMPTS, TARGETS, [0, 1, 0],
                                                         pad_token_id=pad_id(tok)))
    heads = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: heads.append(1))
    try:
        terms = adapter_objective(hn, model, features, None, student, teacher=teacher, kl_weight=0.3,
                                  kl_temperature=2.0)
    finally:
        handle.remove()
    assert len(heads) == 1, "the student's LM head runs once for CE and KL"
    ce = adapter_loss(hn, model, features, None, student)
    out = hn.generate(features, None)  # the KL written out: full student logits, adapters copied per row
    with torch.no_grad(), LoRAPatch(down_proj_targets(model), out.A[student.row_video], out.B[student.row_video],
                                    out.alpha, backend="torch"):
        student_logits = model(input_ids=student.input_ids, attention_mask=student.attention_mask).logits
    teacher_full = torch.zeros(3, int(teacher.counts.max()) + 1, teacher.logits.shape[1])
    teacher_labels = torch.full(teacher_full.shape[:2], IGNORE)
    offsets = torch.cumsum(teacher.counts, 0) - teacher.counts
    for b, (n, o) in enumerate(zip(teacher.counts.tolist(), offsets.tolist())):
        teacher_full[b, :n] = teacher.logits[o:o + n]
        teacher_labels[b, 1:n + 1] = 0
    want_kl = brute_force_kl(student_logits, student.labels, teacher_full, teacher_labels, 2.0)
    assert_rel_close(terms.ce, ce, torch.float32)
    assert abs(float(terms.kl.detach()) - want_kl) <= 1e-4 * want_kl
    assert_rel_close(terms.loss, terms.ce + 0.3 * terms.kl, torch.float32)
    grads = torch.autograd.grad(terms.loss, [p for p in hn.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match=r"^teacher: expected the teacher's answer logits when kl_weight > 0"):
        adapter_objective(hn, model, features, None, student, kl_weight=0.3)


# ---- training with the KL term -------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_kl")
    write_train_and_val(root)
    return root



@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def first_step_terms(trainer: Trainer) -> tuple[float, float]:
    """Step 1's CE and KL computed apart from the trainer's objective: per micro-step, the CE of
    `adapter_loss` and the KL of the brute-force loop on full logits (student: adapters copied per
    row; teacher: the plain VLM forward with each row's pixels), averaged over the micro-steps."""
    model, tok, pre = trainer.vlm.model, trainer.vlm.tokenizer, trainer.vlm.preprocessor
    collate = trainer_module._Collate(tok, pre, trainer.config.instruction)  # no teacher rows
    ce_total, kl_total = 0.0, 0.0
    with torch.no_grad():
        for a in range(trainer.config.grad_accum):
            items = [trainer.dataset[i] for i in trainer.order.micro_step(0, a)[0]]
            micro = collate(items)
            features, mask = trainer._features(micro)
            rows = [(j, row) for j, item in enumerate(items) for row in item.rows]
            prompts, targets = [r.prompt for _, r in rows], [r.target_text for _, r in rows]
            row_video = [j for j, _ in rows]
            student = student_batch(tok, prompts, targets, row_video)
            ce = float(adapter_loss(trainer.eval_adapters, model, features, mask, student))
            out = trainer.hypernet.generate(features, mask)
            with LoRAPatch(down_proj_targets(model), out.A[student.row_video], out.B[student.row_video], out.alpha):
                student_logits = model(input_ids=student.input_ids, attention_mask=student.attention_mask).logits
            videos = [read_video(item.rows[0].video_file, max_frames=pre.max_frames, target_fps=pre.fps)
                      for item in items]
            teacher = teacher_batch(tok, pre, videos, prompts, targets, row_video, pad_token_id=pad_id(tok))
            teacher_logits = model(input_ids=teacher.input_ids, attention_mask=teacher.attention_mask,
                                   pixel_values=teacher.pixel_values[teacher.row_video],
                                   pixel_attention_mask=teacher.pixel_attention_mask[teacher.row_video]).logits
            kl = brute_force_kl(student_logits, student.labels, teacher_logits, teacher.labels,
                                trainer.config.kl_temperature)
            share = 1 / trainer.config.grad_accum  # one process: its rows are the micro-step's
            ce_total, kl_total = ce_total + ce * share, kl_total + kl * share
    return ce_total, kl_total


def test_a_run_with_kl_logs_ce_and_kl_and_its_first_loss_is_ce_plus_weighted_kl_computed_apart(world):
    config = tiny_config(world, out_dir=str(world / "first"), kl_weight=0.5, kl_temperature=2.0, max_steps=2,
                         eval_every=2, save_every=2)
    trainer = Trainer(config, vlm=tiny_vlm(seed=0))
    ce, kl = first_step_terms(trainer)
    result = trainer.run()
    assert result.step == 2
    logged = read_metrics(config.out_dir)
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all({"ce", "kl"} <= r.keys() for r in steps)
    assert kl > 1e-4, "a fresh adapter's student differs from the teacher that sees the video"
    first = steps[0]
    assert abs(first["ce"] - ce) <= 1e-5 * ce and abs(first["kl"] - kl) <= 1e-4 * kl, (first, ce, kl)
    assert abs(first["loss"] - (ce + 0.5 * kl)) <= 1e-5 * first["loss"]
    for r in steps:
        assert abs(r["loss"] - (r["ce"] + 0.5 * r["kl"])) <= 1e-6 * r["loss"]
    val = [r for r in logged if "val_ce" in r]
    assert len(val) == 1 and math.isfinite(val[0]["val_ce"]), "validation is the CE alone"


def test_a_run_with_kl_killed_mid_way_and_resumed_ends_bit_identical(world, monkeypatch, deterministic):
    """With the feature cache: the killed run's videos all have cached features, yet are decoded
    for the teacher; the uninterrupted run extracted them fresh and reused their pixels."""
    vlm = tiny_vlm(seed=0)
    frozen = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    whole = tiny_config(world, out_dir=str(world / "whole"), feature_cache=str(world / "features"), kl_weight=0.5,
                        kl_temperature=2.0)
    assert train(whole, vlm=vlm).step == 6
    assert all(torch.equal(v, frozen[k]) for k, v in vlm.model.state_dict().items()), "the VLM changed"

    killed = whole.replace(out_dir=str(world / "killed"), num_workers=2)
    resumed = killed_after_step_3_then_resumed(monkeypatch, killed, vlm)
    assert resumed.resumed_from.endswith("step-00000002") and resumed.step == 6

    a = load_file(f"{whole.out_dir}/checkpoints/step-00000006/hypernet/model.safetensors")
    b = load_file(f"{killed.out_dir}/checkpoints/step-00000006/hypernet/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"
    drop_time = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(whole.out_dir)]
    assert drop_time == [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(killed.out_dir)]
    kls = [r["kl"] for r in read_metrics(whole.out_dir) if "kl" in r]
    assert len(kls) == 6 and kls[-1] < kls[0], kls

    # the KL settings are part of the run: resuming with others is refused
    with pytest.raises(ValueError, match=r"config.json: kl_weight: expected 0.25 as in this run"):
        Trainer(killed.replace(kl_weight=0.25), vlm=vlm)


def test_the_kl_settings_are_checked_and_explained(capsys):
    with pytest.raises(ValueError, match=r"^config: kl_temperature: expected a value > 0, got 0.0$"):
        TrainConfig(kl_temperature=0.0)
    with pytest.raises(ValueError, match=r"^config: kl_weight: expected a value >= 0, got -0.1$"):
        TrainConfig(kl_weight=-0.1)
    for argv, message in ((["--kl-temperature", "0"], "--kl-temperature: expected a value > 0, got 0.0"),
                          (["--kl-weight", "-1"], "--kl-weight: expected a value >= 0, got -1.0")):
        assert main(["train", *argv]) == 2
        assert capsys.readouterr().err.strip() == f"v2l-fast train: error: {message}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("KL(teacher ‖ student)", "frozen VLM with the video in context", "--feature-cache",
                 "scaled by T²", "(default: 0.0)"):
        assert text in out, text


def test_torchrun_with_kl_on_two_cpu_processes_follows_one_process_with_the_same_global_batch(tmp_path):
    """The KL term is a per-row mean like the CE: DDP's share weighting makes 2 ranks of 1 video each
    log the same loss, ce and kl as 1 process of 2 videos, and reach the same weights."""
    write_clips(tmp_path, clips=5, questions=3)
    save_tiny_vlm(tmp_path / "vlm")
    common = ["train", "--vlm", str(tmp_path / "vlm"), "--train-manifest", str(tmp_path / "train.jsonl"),
              "--rank", "4", "--latent-size", "32", "--num-latent-queries", "4", "--num-blocks", "1",
              "--max-frames", "2", "--lr", "3e-3", "--warmup-ratio", "0.25", "--max-steps", "2",
              "--questions-per-video", "2", "--grad-accum", "2", "--save-every", "2", "--num-workers", "0",
              "--no-progress", "--seed", "7", "--device", "cpu", "--no-bf16",  # fp32 tolerance on AMX CPUs too
              "--kl-weight", "0.5", "--kl-temperature", "2"]
    for argv in (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "v2l_fast", *common,
                  "--videos-per-device", "1", "--out-dir", str(tmp_path / "two")],
                 ["-m", "v2l_fast", *common, "--videos-per-device", "2", "--out-dir", str(tmp_path / "one")]):
        run_v2l_fast(argv)
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2] and [sorted(r) for r in two] == [sorted(r) for r in one]
    for a, b in zip(two, one):
        # the KL is a small difference of log-probabilities: fp32 holds fewer of its digits
        for key, tol in (("loss", 1e-5), ("ce", 1e-5), ("kl", 1e-4), ("grad_norm", 1e-5)):
            assert abs(a[key] - b[key]) <= tol * abs(b[key]), (key, a, b)
    weights_two = load_file(tmp_path / "two" / "checkpoints" / "step-00000002" / "hypernet" / "model.safetensors")
    weights_one = load_file(tmp_path / "one" / "checkpoints" / "step-00000002" / "hypernet" / "model.safetensors")
    for key, value in weights_one.items():
        assert_rel_close(weights_two[key], value)
