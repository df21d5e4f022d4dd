"""The training objective (docs/method.md §7): teacher-forced cross-entropy over answer tokens.

Student input: the tokenizer's chat template of ``user [prompt]`` followed by ``assistant
[target]`` (no generation prompt), right-padded; labels are −100 over the prompt (its length is
that of the prompt templated *with* the generation prompt) and over padding. The loss is the
next-token cross-entropy in fp32 over label tokens, averaged per sample over its tokens, then
over samples.

One generated adapter per video serves all of that video's questions in the step: the rows of
a batch carry their video's index (``row_video``), which becomes the `LoRAPatch`'s row → adapter
map, i.e. segments of `lora_sgmv` — never a copy of the adapter per row or per token.

The LM head runs only on the positions that predict a label token. The loss is the same as
with full logits (cross-entropy at other positions is multiplied by zero), but the head's
``[positions, vocab]`` GEMM — the largest of a small model's step — shrinks to the answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2l_fast.errors import check_tensor, fail
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


def student_batch(tokenizer, prompts: list[str], targets: list[str], row_video: list[int] | torch.Tensor
                  ) -> StudentBatch:
    """Tokenize ``prompts[i]`` + ``targets[i]`` as spec §7's student rows (CPU tensors).

    ``row_video[i]`` is the video (adapter index of the step) that row i asks about.
    """
    if len(prompts) != len(targets) or len(prompts) != len(row_video):
        fail("targets", f"one target and one video index per prompt ({len(prompts)} prompts)",
             f"{len(targets)} targets, {len(row_video)} video indices")
    if not prompts:
        fail("prompts", "at least one prompt", "none")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, starts = [], []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        full, prompt_only = _templated_ids(tokenizer, prompt, target), _templated_ids(tokenizer, prompt, None)
        if full[:len(prompt_only)] != prompt_only or len(full) == len(prompt_only):
            fail(f"targets[{i}]", "a non-empty answer that extends the templated prompt", repr(target[:80]))
        rows.append(full)
        starts.append(len(prompt_only))
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


def answer_loss(model: torch.nn.Module, batch: StudentBatch) -> torch.Tensor:
    """Spec §7's CE of ``model`` (a SmolVLM generation model, patched or not) on ``batch``.

    Per-token fp32 cross-entropy of the label tokens, averaged per row over its label tokens,
    then over rows. The LM head is applied only where a label is predicted.
    """
    check_tensor("labels", batch.labels, ndim=2, index=True, shape_hint="[rows, T]")
    hidden = inner_model(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                use_cache=False, return_dict=True).last_hidden_state
    return label_ce(model, hidden, batch.labels)


def label_ce(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`answer_loss`'s CE from the final hidden states ``[rows, T, H]`` of ``model``'s decoder.

    The LM head runs only where ``labels [rows, T]`` has a label at the next position.
    """
    check_tensor("labels", labels, ndim=2, index=True, shape_hint="[rows, T]")
    targets = labels[:, 1:]
    predicts = targets != IGNORE  # position t predicts token t + 1
    counts = predicts.sum(1)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().squeeze(1).tolist()
        fail("labels", "at least one answer token in every row", f"rows without one: {empty}")
    logits = model.get_output_embeddings()(hidden[:, :-1][predicts]).float()
    token_loss = F.cross_entropy(logits, targets[predicts], reduction="none")
    row_of_token = predicts.nonzero()[:, 0]
    return (token_loss / counts[row_of_token]).sum() / labels.shape[0]


def adapter_loss(hypernet: torch.nn.Module, model: torch.nn.Module, features: torch.Tensor,
                 feature_mask: torch.Tensor | None, batch: StudentBatch, *, backend: str = "auto") -> torch.Tensor:
    """The step's loss: adapters from ``features`` (one per video), then `answer_loss` with them.

    ``features [videos, L, S, H]`` are the frozen VLM's stacked layer states (cached or fresh);
    row b of ``batch`` uses adapter ``batch.row_video[b]``. Gradients reach the hypernetwork
    only through the generated adapters (the VLM's parameters should not require grad).
    """
    out = hypernet.generate(features, feature_mask)
    device = next(model.parameters()).device
    with LoRAPatch(down_proj_targets(model), out.A, out.B, out.alpha, row_adapters=batch.row_video.to(device),
                   backend=backend):
        return answer_loss(model, batch.to(device))
