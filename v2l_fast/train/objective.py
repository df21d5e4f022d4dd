"""The training objective (docs/method.md §7): teacher-forced cross-entropy over answer tokens,
plus the optional KL to the VLM that sees the video.

Student input: the tokenizer's chat template of ``user [prompt]`` followed by ``assistant
[target]`` (no generation prompt), right-padded; labels are −100 over the prompt (its length is
that of the prompt templated *with* the generation prompt) and over padding. The loss is the
next-token cross-entropy in fp32 over label tokens, averaged per sample over its tokens, then
over samples.

Optional KL (`kl_loss`): the teacher is the frozen, unpatched VLM with ``[video, prompt]`` and
the same target in its context (`v2l_fast.train.distill`); per sample, Σ_v p_T (log p_T − log p_S)
at each answer token, both softened by the temperature T, the two answers' tokens aligned in
order and truncated to the shorter one, averaged over those tokens, then over the samples, and
multiplied by T². The total is CE + ``kl_weight`` · KL (`adapter_objective`).

One generated adapter per video serves all of that video's questions in the step: the rows of
a batch carry their video's index (``row_video``), which becomes the `LoRAPatch`'s row → adapter
map, i.e. segments of `lora_sgmv` — never a copy of the adapter per row or per token.

The LM head runs only on the positions that predict a label token. The loss is the same as
with full logits (cross-entropy at other positions is multiplied by zero), but the head's
``[positions, vocab]`` GEMM — the largest of a small model's step — shrinks to the answers.
Without the KL term those logits are never stored: `label_ce` makes them chunk by chunk with
their gradient (`v2l_fast.train.linear_ce`). With it, the CE and the KL share one set of
logits: the head runs once per step for both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2l_fast.errors import check_tensor, fail
from v2l_fast.train.linear_ce import linear_cross_entropy
from v2l_fast.vlm.features import inner_model
from v2l_fast.vlm.lora_patch import LoRAPatch, down_proj_targets

IGNORE = -100


@dataclass
class StudentBatch:
    """Text-only student rows: ``[rows, T]`` ids, mask and labels, and each row's video."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    row_video: torch.Tensor  # [rows] int64, index of the row's video (its adapter) in the step

    def to(self, device) -> StudentBatch:
        """The batch on ``device``."""
        return StudentBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                       self.row_video)))


def _templated_ids(tokenizer, prompt: str, target: str | None) -> list[int]:
    turns = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    if target is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=target is None)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def student_row_ids(tokenizer, prompt: str, target: str) -> tuple[tuple[int, ...], int | None]:
    """(ids of ``prompt`` + ``target`` as spec §7's student row, where the answer starts — None
    if the answer does not extend the templated prompt): the chat template rendered and tokenized
    twice, with and without the answer."""
    full, prompt_only = _templated_ids(tokenizer, prompt, target), _templated_ids(tokenizer, prompt, None)
    extends = full[:len(prompt_only)] == prompt_only and len(full) > len(prompt_only)
    return tuple(full), len(prompt_only) if extends else None


def cached_student_row_ids(tokenizer, size: int = 1 << 14):
    """`student_row_ids` of ``tokenizer`` remembering the last ``size`` (prompt, target) pairs.

    A training run asks the same questions of many videos and many answers repeat (the synthetic
    world: a few hundred distinct pairs); rendering and tokenizing each row twice was ~30 ms of a
    toy hypernetwork step's 32 rows. The ids are a function of the pair, so the rows are unchanged.
    """
    return functools.lru_cache(maxsize=size)(functools.partial(student_row_ids, tokenizer))


def student_batch(tokenizer, prompts: list[str], targets: list[str], row_video: list[int] | torch.Tensor, *,
                  row_ids=None) -> StudentBatch:
    """Tokenize ``prompts[i]`` + ``targets[i]`` as spec §7's student rows (CPU tensors).

    ``row_video[i]`` is the video (adapter index of the step) that row i asks about. ``row_ids``:
    `cached_student_row_ids` of the tokenizer, to tokenize a repeated pair once (None: every row).
    """
    if len(prompts) != len(targets) or len(prompts) != len(row_video):
        fail("targets", f"one target and one video index per prompt ({len(prompts)} prompts)",
             f"{len(targets)} targets, {len(row_video)} video indices")
    if not prompts:
        fail("prompts", "at least one prompt", "none")
    row_ids = row_ids or functools.partial(student_row_ids, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, starts = [], []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        full, start = row_ids(prompt, target)
        if start is None:
            fail(f"targets[{i}]", "a non-empty answer that extends the templated prompt", repr(target[:80]))
        rows.append(list(full))
        starts.append(start)
    return StudentBatch(*right_pad_labelled(rows, starts, pad), torch.as_tensor(row_video, dtype=torch.long))


def right_pad_labelled(rows: list[list[int]], starts: list[int], pad: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` ``[rows, T]`` of token rows right-padded with
    ``pad``; row b is labelled from ``starts[b]`` to its end, −100 elsewhere (prompt, padding)."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, (row, start) in enumerate(zip(rows, starts)):
        input_ids[b, :len(row)] = torch.tensor(row)
        attention_mask[b, :len(row)] = 1
        labels[b, start:len(row)] = input_ids[b, start:len(row)]
    return input_ids, attention_mask, labels


@dataclass
class AnswerLogits:
    """A model's logits at the positions that predict answer tokens, packed row after row.

    ``logits [tokens, vocab]`` fp32: row 0's answer positions in order, then row 1's, …;
    ``targets [tokens]`` the answer token each position predicts; ``counts [rows]`` how many
    positions each row has (all ≥ 1).
    """

    logits: torch.Tensor
    targets: torch.Tensor
    counts: torch.Tensor


@dataclass
class LossTerms:
    """A step's objective: ``loss`` = ``ce`` + kl_weight · ``kl`` (``kl`` None when the KL term is off)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor | None


def answer_logits(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> AnswerLogits:
    """``model``'s LM head on the final hidden states ``[rows, T, H]`` where ``labels [rows, T]``
    has a label at the next position (position t predicts token t + 1), in fp32.

    Refuses a row without an answer token (its mean over answer tokens would be 0/0).
    """
    states, targets, counts = _answer_states(hidden, labels)
    return AnswerLogits(model.get_output_embeddings()(states).float(), targets, counts)


def _answer_states(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states at the answer-predicting positions ``[tokens, H]``, their targets, answer
    tokens per row), packed row after row; a row without an answer token is refused."""
    check_tensor("labels", labels, ndim=2, index=True, shape_hint="[rows, T]")
    targets = labels[:, 1:]
    predicts = targets != IGNORE
    counts = predicts.sum(1)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().squeeze(1).tolist()
        fail("labels", "at least one answer token in every row", f"rows without one: {empty}")
    return hidden[:, :-1][predicts], targets[predicts], counts


def _token_weights(counts: torch.Tensor) -> torch.Tensor:
    """Spec §7's weight of each answer token: 1 / (answer tokens of its row · rows)."""
    return torch.repeat_interleave(1.0 / (counts.float() * len(counts)), counts)


def answer_ce(answer: AnswerLogits) -> torch.Tensor:
    """Spec §7's CE from `answer_logits`: fp32 cross-entropy of each answer token, averaged per
    row over its tokens (each token weighted 1/count of its row), then over rows."""
    token_loss = F.cross_entropy(answer.logits, answer.targets, reduction="none")
    return (token_loss * _token_weights(answer.counts)).sum()


def answer_loss(model: torch.nn.Module, batch: StudentBatch) -> torch.Tensor:
    """Spec §7's CE of ``model`` (a SmolVLM generation model, patched or not) on ``batch``.

    Per-token fp32 cross-entropy of the label tokens, averaged per row over its label tokens,
    then over rows. The LM head is applied only where a label is predicted (`label_ce`).
    """
    return label_ce(model, student_hidden(model, batch), batch.labels)


def student_hidden(model: torch.nn.Module, batch: StudentBatch) -> torch.Tensor:
    """The final hidden states ``[rows, T, H]`` of ``model``'s decoder (patched or not) on the
    text-only student rows ``batch``."""
    check_tensor("labels", batch.labels, ndim=2, index=True, shape_hint="[rows, T]")
    return inner_model(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              use_cache=False, return_dict=True).last_hidden_state


def label_ce(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`answer_ce` of `answer_logits` ``(model, hidden, labels)``, without storing the logits.

    The LM head runs only where ``labels [rows, T]`` has a label at the next position, chunk by
    chunk with each chunk's gradient made at once (`linear_cross_entropy`: the ``[tokens, vocab]``
    logits are never kept for backward); a head with a bias takes the plain path.
    """
    states, targets, counts = _answer_states(hidden, labels)
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return answer_ce(AnswerLogits(head(states).float(), targets, counts))
    return linear_cross_entropy(states, head.weight, targets, _token_weights(counts))


def kl_loss(student: AnswerLogits | torch.Tensor, teacher: AnswerLogits | torch.Tensor, temperature: float, *,
            student_counts: torch.Tensor | None = None, teacher_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Spec §7's KL(teacher ‖ student) at temperature T, in fp32.

    With p = softmax(teacher logits / T) and q = softmax(student logits / T) at one answer
    position, the token's term is Σ_v p_v (log p_v − log q_v). Row b has n_b student and m_b
    teacher answer positions (``counts``; the logits are packed row after row as `answer_logits`
    packs them); its first k_b = min(n_b, m_b) positions of each are paired in order (the
    longer answer's tail is dropped), and the row's KL is the mean of the k_b terms. The result
    is the mean over rows, times T² (the scale that keeps the gradient's size independent of T).

    ``student`` and ``teacher`` are `AnswerLogits`, or packed ``[tokens, vocab]`` logits with
    ``student_counts`` / ``teacher_counts``. Gradients flow into the student's logits only.
    """
    if isinstance(student, AnswerLogits):
        student, student_counts = student.logits, student.counts
    if isinstance(teacher, AnswerLogits):
        teacher, teacher_counts = teacher.logits, teacher.counts
    if student_counts is None or teacher_counts is None:
        fail("counts", "the answer positions of each row (AnswerLogits, or student_counts and teacher_counts)",
             "none")
    if not temperature > 0:
        fail("temperature", "a value > 0", temperature)
    check_tensor("student_logits", student, ndim=2, floating=True, shape_hint="[tokens, vocab]")
    check_tensor("teacher_logits", teacher, ndim=2, floating=True, shape_hint="[tokens, vocab]")
    device = student.device
    student_counts, teacher_counts = student_counts.to(device), teacher_counts.to(device)
    if student_counts.shape != teacher_counts.shape or student_counts.ndim != 1:
        fail("teacher_counts", f"one count per row, as the student's {list(student_counts.shape)}",
             list(teacher_counts.shape))
    if student.shape[1] != teacher.shape[1]:
        fail("teacher_logits", f"the student's vocabulary ({student.shape[1]})", teacher.shape[1])
    for name, logits, counts in (("student", student, student_counts), ("teacher", teacher, teacher_counts)):
        if int(counts.sum()) != logits.shape[0] or bool((counts < 1).any()):
            fail(f"{name}_counts", f"counts >= 1 adding up to the {logits.shape[0]} packed positions",
                 counts.tolist())
    rows = len(student_counts)
    paired = torch.minimum(student_counts, teacher_counts)
    row_of = torch.repeat_interleave(torch.arange(rows, device=device), paired)
    within = torch.arange(int(paired.sum()), device=device) - torch.repeat_interleave(
        torch.cumsum(paired, 0) - paired, paired)
    s_index = torch.cumsum(student_counts, 0)[row_of] - student_counts[row_of] + within
    t_index = torch.cumsum(teacher_counts, 0)[row_of] - teacher_counts[row_of] + within
    log_q = F.log_softmax(student[s_index].float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher[t_index].detach().float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (per_token / paired[row_of]).sum() / rows * temperature ** 2


def adapter_objective(hypernet: torch.nn.Module, model: torch.nn.Module, features: torch.Tensor,
                      feature_mask: torch.Tensor | None, batch: StudentBatch, *, teacher: AnswerLogits | None = None,
                      kl_weight: float = 0.0, kl_temperature: float = 1.0, backend: str = "auto") -> LossTerms:
    """The step's objective: adapters from ``features`` (one per video), the student's answer
    logits with them (one LM head for both terms), spec §7's CE, and with ``teacher`` (the
    frozen VLM's `AnswerLogits` on the same rows with their videos in context,
    `v2l_fast.train.distill.teacher_answer_logits`) ``kl_weight`` · `kl_loss` at ``kl_temperature``.

    ``features [videos, L, S, H]`` are the frozen VLM's stacked layer states (cached or fresh);
    row b of ``batch`` uses adapter ``batch.row_video[b]``. Gradients reach the hypernetwork
    only through the generated adapters (the VLM's parameters should not require grad).
    """
    if kl_weight > 0 and teacher is None:
        fail("teacher", "the teacher's answer logits when kl_weight > 0", "none")
    out = hypernet.generate(features, feature_mask)
    device = next(model.parameters()).device
    batch = batch.to(device)
    with LoRAPatch(down_proj_targets(model), out.A, out.B, out.alpha, row_adapters=batch.row_video,
                   backend=backend):
        hidden = student_hidden(model, batch)
    if kl_weight <= 0:
        ce = label_ce(model, hidden, batch.labels)
        return LossTerms(ce, ce, None)
    student = answer_logits(model, hidden, batch.labels)
    ce = answer_ce(student)
    kl = kl_loss(student, teacher, kl_temperature)
    return LossTerms(ce + kl_weight * kl, ce, kl)


def adapter_loss(hypernet: torch.nn.Module, model: torch.nn.Module, features: torch.Tensor,
                 feature_mask: torch.Tensor | None, batch: StudentBatch, *, backend: str = "auto") -> torch.Tensor:
    """The step's CE: adapters from ``features`` (one per video), then `answer_loss` with them
    (`adapter_objective` without the KL term)."""
    return adapter_objective(hypernet, model, features, feature_mask, batch, backend=backend).loss
