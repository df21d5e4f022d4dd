"""The training objective: spec §7's student rows and loss, and one adapter per video shared by its rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from v2l_fast.testing import assert_rel_close, tiny_hypernet
from v2l_fast.train.objective import IGNORE, adapter_loss, answer_loss, cached_student_row_ids, student_batch
from v2l_fast.vlm import LoRAPatch, down_proj_targets
from v2l_fast.vlm.factory import tiny_vlm

PROMPTS = ["What colour is the circle?", "Which way does it move?", "How many shapes are there?"]
TARGETS = ["red", "to the left, slowly", "three"]


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(seed=3)


def authors_loss(model, batch) -> torch.Tensor:
    """Spec §7 written out: full logits, fp32 CE per label token, mean per row, mean over rows."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    per_row = []
    for b in range(batch.labels.shape[0]):
        labels = batch.labels[b, 1:]
        keep = labels != IGNORE
        per_row.append(F.cross_entropy(logits[b, :-1][keep], labels[keep]))
    return torch.stack(per_row).mean()


def test_student_rows_label_only_the_answer_and_pad_on_the_right(vlm):
    tok = vlm.tokenizer
    batch = student_batch(tok, PROMPTS, TARGETS, [0, 0, 1])
    for b, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        conversation = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        prompt_len = len(tok(tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"])
        length = int(batch.attention_mask[b].sum())
        assert batch.attention_mask[b, :length].all() and not batch.attention_mask[b, length:].any()
        assert (batch.labels[b, :prompt_len] == IGNORE).all() and (batch.labels[b, length:] == IGNORE).all()
        answer = tok.decode(batch.labels[b, prompt_len:length])
        assert answer.strip().startswith(target)
        assert (batch.input_ids[b, length:] == tok.pad_token_id).all()
    assert batch.row_video.tolist() == [0, 0, 1]


def test_repeated_pairs_are_tokenized_once_and_give_the_same_rows(vlm):
    row_ids = cached_student_row_ids(vlm.tokenizer, size=2)
    prompts, targets = PROMPTS * 2 + PROMPTS[:1], TARGETS * 2 + TARGETS[:1]
    videos = [0, 0, 1, 1, 2, 2, 3]
    plain = student_batch(vlm.tokenizer, prompts, targets, videos)
    for _ in range(2):
        cached = student_batch(vlm.tokenizer, prompts, targets, videos, row_ids=row_ids)
        for field in ("input_ids", "attention_mask", "labels", "row_video"):
            assert torch.equal(getattr(cached, field), getattr(plain, field)), field
    # a cache of 2 pairs over 3 pairs cycling: every row of the cycle misses, the repeat of the last hits
    assert row_ids.cache_info().misses == 13 and row_ids.cache_info().hits == 1
    with pytest.raises(ValueError, match=r"^targets\[1\]: expected a non-empty answer that extends the templated "
                                         r"prompt, got 'blue'$"):  # an answer the template does not append
        student_batch(vlm.tokenizer, PROMPTS[:2], ["red", "blue"], [0, 0],
                      row_ids=lambda prompt, target: ((1, 2, 3), None if target == "blue" else 2))


@pytest.mark.parametrize("prompts,targets,videos,match", [
    (PROMPTS, TARGETS[:2], [0, 0, 1], "^targets: expected one target"),
    (PROMPTS, TARGETS, [0, 1], "^targets: expected one target"),
    ([], [], [], "^prompts: expected at least one"),
])
def test_student_batch_rejects_mismatched_rows(vlm, prompts, targets, videos, match):
    with pytest.raises(ValueError, match=match):
        student_batch(vlm.tokenizer, prompts, targets, videos)


def test_answer_loss_equals_the_full_logits_cross_entropy(vlm):
    batch = student_batch(vlm.tokenizer, PROMPTS, TARGETS, [0, 1, 2])
    with torch.no_grad():
        assert_rel_close(answer_loss(vlm.model, batch), authors_loss(vlm.model, batch), torch.float32)


def test_a_row_without_answer_tokens_is_refused(vlm):
    batch = student_batch(vlm.tokenizer, PROMPTS, TARGETS, [0, 1, 2])
    batch.labels[1] = IGNORE
    with pytest.raises(ValueError, match=r"^labels: expected at least one answer token in every row, got .*\[1\]"):
        answer_loss(vlm.model, batch)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_shared_adapters_equal_per_row_copies_in_loss_and_hypernet_gradients(vlm, backend):
    """Two videos, three questions: segments of one adapter per video == that adapter copied per row."""
    model = vlm.model.requires_grad_(False)
    cfg = model.config.text_config
    hn = tiny_hypernet(model)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, cfg.num_hidden_layers, 11, cfg.hidden_size, generator=gen)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    batch = student_batch(vlm.tokenizer, PROMPTS, TARGETS, [0, 0, 1])

    loss = adapter_loss(hn, model, features, mask, batch, backend=backend)
    grads = torch.autograd.grad(loss, list(hn.parameters()), allow_unused=True)

    out = hn.generate(features, mask)  # the same adapters, copied per row
    with LoRAPatch(down_proj_targets(model), out.A[batch.row_video], out.B[batch.row_video], out.alpha,
                   backend="torch"):
        copied = authors_loss(model, batch)
    copied_grads = torch.autograd.grad(copied, list(hn.parameters()), allow_unused=True)

    assert_rel_close(loss, copied, torch.float32)
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > len(grads) // 2
    for got, want in zip(grads, copied_grads):
        assert (got is None) == (want is None)
        if got is not None and want.abs().sum() > 0:
            assert_rel_close(got, want, torch.float32)
    assert all(p.grad is None for p in model.parameters())
