"""A tiny SmolVLM2 trained from scratch on the synthetic world, with the video in its context.

The first stage of the toy-scale replication (a VLM that answers the world's questions when it
sees the clip; it later becomes the frozen base and teacher of a hypernetwork). `toy_vlm_config`
sizes a ``SmolVLMConfig`` for 64-px clips (`TOY_SHAPES`: patch 8 → 8×8 patches per frame, pixel
shuffle to `TOKENS_PER_FRAME` ``<image>`` tokens per frame: 16 by default) with a small Llama decoder and one of
`TOKENIZERS`: ``"word"``, the world's word-level `world_tokenizer` (one id per word and per
fixed phrase of the video prompt: an 8-frame question row is ~94 tokens instead of ~347), or
``"char"``, the character-level `tiny_smolvlm_tokenizer` (vocabulary 160: it spells every
answer and question of the world). `train_toy_vlm` trains ALL its weights — vision tower,
connector, decoder — on the world's train manifest (or, after the optional vision warm-up of
`v2l_fast.train.vision_warmup`, the decoder with the pretrained tower and connector frozen):

* each row is one video's conversation (`in_context_batch`): the teacher's prompt
  (`teacher_prompt`: one user turn ``[video, question]`` in the video chat template) and the
  answer as the chat template renders the assistant turn, then the video's other questions and
  answers as further turns, in an order drawn per step (``packed=True``, the default: the video's
  tokens, ~85 % of a row, are processed once per video instead of once per question, ~3× fewer
  tokens per step); labels cover the answers only; the rows' ids are assembled from per-turn
  pieces tokenized once (`ConversationIds`, equal to rendering every row);
* the loss is spec §7's CE (`label_ce`: fp32, mean per row over its answer tokens, then over
  rows); the vision tower runs once per video of the step, its tokens shared by that video's
  questions (once per video of the run when the warm-up has frozen it: `video_features`);
* AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01), cosine schedule with linear warm-up,
  gradient clipping at 1.0, fp32; data order: epoch e is the permutation of the train videos
  drawn from ``(seed, e)``, each step takes the next ``batch_videos`` videos with all their
  question rows; two kinds of extra rows are options, both off by default because they slowed
  the moment the model starts reading the frames in measured runs (bench/NOTES.md): the video's
  caption row (``captions=True``: every object's size, colour, shape and direction), and each
  question once more without the video in the student's text-only template (``blind=True``:
  the model learns the answer prior for questions it cannot see). The step's loss is the mean
  over all its rows. A run is a pure function of its arguments on one machine; CPU math flushes
  denormals to zero during it (`flush_denormals`).

The videos are decoded once (`VideoQADataset`) and kept in memory as uint8 frames (a world of
3000 clips of 8 × 64² frames: 300 MB). The pixels of a step are made by the same
`VideoPreprocessor` that `load_smolvlm` reads back, so training and a reloaded model see the
same inputs. The output directory holds the model, the tokenizer, ``preprocessor_config.json``
and ``toy_vlm.json`` (settings, final loss, seconds, validation accuracy);
``metrics.jsonl`` gets one line per evaluation.

`in_context_accuracy` answers a manifest's questions greedily with the video in context and
scores exact match of the first word of the answer.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from v2l_fast.api import pad_id
from v2l_fast.data.loader import VideoQADataset
from v2l_fast.data.manifest import ManifestRow, read_manifest
from v2l_fast.errors import check_int, fail
from v2l_fast.train.chat_rows import ConversationIds, conversation_ids
from v2l_fast.train.denormals import flush_denormals
from v2l_fast.train.objective import IGNORE, answer_loss, label_ce, right_pad_labelled, student_batch
from v2l_fast.train.teacher import video_answers
from v2l_fast.train.vision_warmup import vision_parameters, warm_up_vision
from v2l_fast.vlm.features import image_tokens, video_rows_hidden
from v2l_fast.vlm.frames import VideoPreprocessor, pad_frames
from v2l_fast.vlm.load import VLM
from v2l_fast.vlm.video import Video, VideoError

TOY_IMAGE_SIZE = 64
TOY_SHAPES: dict[str, dict] = {
    "S": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16),
              vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)),
    "M": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32),
              vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)),
}
CHAR_VOCAB_SIZE = 160
TOKENIZERS = ("word", "char")
IMAGE_TOKEN_ID = 150
PATCH_SIZE = 8
# <image> tokens per frame → pixel-shuffle factor on the 8×8 patch grid. 4 tokens per frame kept
# a model S at the blind prior for 2000 steps; 16 read colours within 1000 (bench/NOTES.md).
TOKENS_PER_FRAME = {4: 4, 16: 2, 64: 1}
TOY_INFO = "toy_vlm.json"
METRICS_FILE = "metrics.jsonl"


def toy_vlm_config(size: str = "S", *, vocab_size: int = CHAR_VOCAB_SIZE, tokens_per_frame: int = 16):
    """A ``SmolVLMConfig`` for 64-px clips: `TOY_SHAPES[size]`, patch 8, ``tokens_per_frame``.

    ``tokens_per_frame`` ``<image>`` tokens per frame (a `TOKENS_PER_FRAME` key: the 64 patches
    pixel-shuffled by 4, 2 or 1); decoder positions up to 1024 (an 8-frame question is about
    350 tokens with the character tokenizer and 4 tokens per frame); ``vocab_size`` is the
    tokenizer's length, whose special ids both `TOKENIZERS` share (pad 0, bos 1, eos 2,
    ``<image>`` 150).
    """
    from transformers import SmolVLMConfig

    if size not in TOY_SHAPES:
        fail("size", f"one of {sorted(TOY_SHAPES)}", repr(size))
    if tokens_per_frame not in TOKENS_PER_FRAME:
        fail("tokens_per_frame", f"one of {sorted(TOKENS_PER_FRAME)}", repr(tokens_per_frame))
    shape = TOY_SHAPES[size]
    text = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, vocab_size=vocab_size,
                max_position_embeddings=1024, **shape["text"])
    vision = dict(model_type="smolvlm_vision", image_size=TOY_IMAGE_SIZE, patch_size=PATCH_SIZE, **shape["vision"])
    return SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=TOKENS_PER_FRAME[tokens_per_frame],
                         image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=False)


def toy_preprocessor_dict() -> dict:
    """The ``preprocessor_config.json`` of a toy VLM (what `load_smolvlm` reads back)."""
    return {"image_processor_type": "SmolVLMImageProcessor", "max_image_size": {"longest_edge": TOY_IMAGE_SIZE},
            # frames go straight to 64 px: the default first resize to 384 px and back (2 LANCZOS
            # passes per frame, every step) made a toy step 2.2× slower (bench/NOTES.md)
            "v2l_fast": {"longest_edge": TOY_IMAGE_SIZE},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
            "video_sampling": {"fps": 1.0}}


def build_toy_vlm(size: str = "S", *, seed: int = 0, tokenizer: str = "word", tokens_per_frame: int = 16) -> VLM:
    """A randomly initialised toy `VLM` (fp32, CPU, train mode) with its tokenizer and preprocessor.

    ``tokenizer`` is one of `TOKENIZERS`: ``"word"`` (`world_tokenizer`) or ``"char"``
    (`tiny_smolvlm_tokenizer`); ``tokens_per_frame`` as in `toy_vlm_config`.
    """
    from transformers import SmolVLMForConditionalGeneration

    from v2l_fast.data.synthetic_tokenizer import world_tokenizer
    from v2l_fast.vlm.factory import tiny_smolvlm_tokenizer

    if tokenizer not in TOKENIZERS:
        fail("tokenizer", f"one of {list(TOKENIZERS)}", repr(tokenizer))
    tok = world_tokenizer() if tokenizer == "word" else tiny_smolvlm_tokenizer(CHAR_VOCAB_SIZE)
    config = toy_vlm_config(size, vocab_size=len(tok), tokens_per_frame=tokens_per_frame)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    return VLM(model, tok, VideoPreprocessor.for_model(config, toy_preprocessor_dict()))


@dataclass
class InContextBatch:
    """Rows ``[video, question] answer [question] answer …`` of a step: ids, mask, labels, the videos' pixels.

    ``row_video[i]`` is the index of the video row i is about, in ``pixel_values`` (the tower runs
    on them) or in ``video_features`` (the videos' ``<image>`` tokens, made once by `video_features`).
    """

    input_ids: torch.Tensor  # [rows, T] int64, right-padded
    attention_mask: torch.Tensor  # [rows, T] int64
    labels: torch.Tensor  # [rows, T] int64, IGNORE outside the answers
    pixel_values: torch.Tensor | None  # [videos, F, 3, S, S] float32; None when video_features are given
    pixel_attention_mask: torch.Tensor | None  # [videos, F, S, S] bool
    row_video: torch.Tensor  # [rows] int64
    video_features: list[torch.Tensor] | None = None  # per video, what `video_features` returns


def in_context_batch(vlm: VLM, videos: Sequence[Video], conversations: Sequence[Sequence[tuple[str, str]]],
                     row_video: Sequence[int], *, features: Sequence[torch.Tensor] | None = None,
                     token_rows: ConversationIds | None = None) -> InContextBatch:
    """Row i: the conversation ``conversations[i]`` — ``(question, answer)`` turns — about
    ``videos[row_video[i]]``, rendered by the video chat template.

    The first user turn is the teacher's prompt (`teacher_prompt`: the video, then the first
    question), so a one-turn row is exactly what the teacher and `in_context_accuracy` see; later
    questions follow as text-only user turns. Each answer is rendered as the assistant turn
    (``" red<end_of_utterance>\\n"``) and labelled; every other token is IGNORE. Several
    questions in one row share one pass over the video's tokens (the video is ~85 % of a row).
    ``features`` (one per video, from `video_features`) replaces the pixels: the batch then
    carries each video's ``<image>`` tokens and the tower does not run. ``token_rows`` makes the
    rows' ids from cached pieces (`ConversationIds`: the same ids, without rendering the template
    for every turn of every row); None: `conversation_ids`.
    """
    if features is not None and len(features) != len(videos):
        fail("features", f"one tensor per video ({len(videos)} videos)", f"{len(features)} tensors")
    if len(conversations) != len(row_video) or not conversations:
        fail("row_video", f"one video index per conversation, at least one ({len(conversations)} conversations)",
             f"{len(row_video)} video indices")
    if not videos or min(row_video) < 0 or max(row_video) >= len(videos):
        fail("row_video", f"indices into the {len(videos)} videos", list(row_video))
    tokenizer, pre = vlm.tokenizer, vlm.preprocessor
    make = token_rows or functools.partial(conversation_ids, tokenizer)
    rows, spans = [], []
    for i, (conversation, v) in enumerate(zip(conversations, row_video)):
        ids, row_spans = make(pre.video_text(videos[v]), conversation, name=f"conversations[{i}]")
        rows.append(ids)
        spans.append(row_spans)
    input_ids, attention_mask, labels = right_pad_labelled(rows, [row_spans[0][0] for row_spans in spans],
                                                           pad_id(tokenizer))
    for b, row_spans in enumerate(spans):  # unlabel the user turns between answers
        for (_, end), (start, _) in zip(row_spans, row_spans[1:]):
            labels[b, end:start] = IGNORE
    row_video = torch.as_tensor(list(row_video), dtype=torch.long)
    if features is not None:
        return InContextBatch(input_ids, attention_mask, labels, None, None, row_video, list(features))
    pixel_values, pixel_mask = pad_frames([pre.pixel_values(video) for video in videos], pre.max_image_size)
    return InContextBatch(input_ids, attention_mask, labels, pixel_values, pixel_mask, row_video)


def in_context_loss(model: torch.nn.Module, batch: InContextBatch) -> torch.Tensor:
    """Spec §7's answer CE of ``model`` (a ``SmolVLMForConditionalGeneration``) with the video in context.

    The vision tower and connector run once per video (not at all when the batch carries the
    videos' tokens, `video_features`); row i's ``<image>`` positions take the tokens of video
    ``row_video[i]``.
    """
    device = next(model.parameters()).device
    if batch.video_features is not None:
        features = [f.to(device) for f in batch.video_features]
    else:
        features = image_tokens(model, batch.pixel_values, batch.pixel_attention_mask)
    hidden = video_rows_hidden(model, batch.input_ids.to(device), batch.attention_mask.to(device), features,
                               batch.row_video)
    return label_ce(model, hidden, batch.labels.to(device))


@torch.no_grad()
def video_features(vlm: VLM, videos: Sequence[Video], *, batch_videos: int = 64,
                   progress: bool = False) -> list[torch.Tensor]:
    """Each video's ``<image>`` tokens as the decoder sees them: the connector's output,
    ``[frames · tokens_per_frame, hidden]`` float32 on the CPU, ``batch_videos`` videos per pass.

    What `in_context_loss` computes from the pixels at every step, done once: while the vision
    tower and connector are frozen (after the vision warm-up) a video's tokens never change, and
    making them again — pixels, then the tower — was 41 of a toy step's ~160 ms (model S, 8 videos
    of 8 frames, 2 cores; bench/NOTES.md). Equal to the per-step tokens within fp32 rounding (the
    tower sees other batches). 10 000 clips of 8 frames at 16 tokens of width 64: 330 MB.
    """
    check_int("batch_videos", batch_videos, 1)
    was_training = vlm.model.training
    vlm.model.eval()
    pre = vlm.preprocessor
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(videos), batch_videos), desc="video tokens", disable=not progress):
        pixels, mask = pad_frames([pre.pixel_values(video) for video in videos[start:start + batch_videos]],
                                  pre.max_image_size)
        out += [f.float().cpu() for f in image_tokens(vlm.model, pixels, mask)]
    vlm.model.train(was_training)
    return out


def first_word(text: str) -> str:
    """The first word of an answer, lower-cased, without surrounding punctuation (``""`` if none)."""
    words = text.split()
    return words[0].strip(".,;:!?\"'").lower() if words else ""


@torch.no_grad()
def in_context_answers(vlm: VLM, videos: Sequence[Video], prompts: Sequence[str], *, max_new_tokens: int = 12,
                       batch_size: int = 32) -> list[str]:
    """Greedy answers to ``prompts[i]`` about ``videos[i]`` with the video in context (teacher prompt)."""
    if len(videos) != len(prompts):
        fail("videos", f"one video per prompt ({len(prompts)} prompts)", f"{len(videos)} videos")
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        answers += video_answers(videos[start:start + batch_size], prompts[start:start + batch_size], vlm,
                                 max_new_tokens=max_new_tokens)
    return answers


def load_questions(manifest: str | os.PathLike, vlm: VLM, *, limit: int | None = None,
                   task_types: Sequence[str] = ("qa",)) -> list[tuple[Video, tuple[ManifestRow, ...]]]:
    """The rows of ``manifest`` whose ``task_type`` is in ``task_types`` grouped by video, decoded.

    ``limit`` keeps the first ``limit`` videos. An unreadable video fails in one line naming it.
    """
    rows = [row for row in read_manifest(manifest, require_targets=True).rows if row.task_type in task_types]
    if not rows:
        fail("manifest", f"a manifest with rows of task_type {list(task_types)}", repr(os.fspath(manifest)))
    dataset = VideoQADataset(rows, vlm.preprocessor)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    out = []
    for i in range(count):
        item = dataset[i]
        if item.error:
            raise VideoError(item.error)
        out.append((item.video, item.rows))
    return out


def in_context_accuracy(vlm: VLM, questions: str | os.PathLike | Sequence[tuple[Video, Sequence[ManifestRow]]], *,
                        batch_size: int = 32, max_new_tokens: int = 12) -> dict[str, float]:
    """Exact match of the first word of the greedy in-context answer with ``target_text``.

    ``questions`` is a manifest path or what `load_questions` returns. Returns the accuracy per
    ``metadata["question_type"]`` and over ``"all"``, and the number of questions ``"n"``.
    """
    if isinstance(questions, (str, os.PathLike)):
        questions = load_questions(questions, vlm)
    pairs = [(video, row) for video, rows in questions for row in rows if row.task_type == "qa"]
    if not pairs:
        fail("questions", "at least one question", "none")
    was_training = vlm.model.training
    vlm.model.eval()
    answers = in_context_answers(vlm, [v for v, _ in pairs], [r.prompt for _, r in pairs],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    vlm.model.train(was_training)
    right, total = Counter(), Counter()
    for (_, row), answer in zip(pairs, answers):
        kind = row.metadata.get("question_type", "qa")
        total[kind] += 1
        right[kind] += first_word(answer) == first_word(row.target_text)
    result = {kind: right[kind] / total[kind] for kind in sorted(total)}
    result["all"] = sum(right.values()) / len(pairs)
    result["n"] = len(pairs)
    return result


def save_toy_vlm(vlm: VLM, out_dir: str | os.PathLike) -> str:
    """Write the model, tokenizer and ``preprocessor_config.json`` so that `load_smolvlm` loads them."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    vlm.model.save_pretrained(out_dir)
    vlm.tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(toy_preprocessor_dict(), f, indent=1)
    return out_dir


def _check_args(world_dir, steps, batch_videos, lr, warmup_ratio, eval_every, vision_warmup_steps,
                device) -> torch.device:
    if not os.path.isfile(os.path.join(os.fspath(world_dir), "train.jsonl")):
        fail("world_dir", "a synthetic world folder with train.jsonl (v2l-fast world)", repr(os.fspath(world_dir)))
    check_int("steps", steps, 1)
    check_int("batch_videos", batch_videos, 1)
    check_int("eval_every", eval_every, 0, "0: evaluate only at the end")
    check_int("vision_warmup_steps", vision_warmup_steps, 0, "0: no warm-up")
    if not isinstance(lr, (int, float)) or not lr > 0:
        fail("lr", "a number > 0", repr(lr))
    if not isinstance(warmup_ratio, (int, float)) or not 0 <= warmup_ratio < 1:
        fail("warmup_ratio", "a number in [0, 1)", repr(warmup_ratio))
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        fail("device", "a torch device ('cpu', 'cuda')", repr(device))


@flush_denormals()
def train_toy_vlm(world_dir: str | os.PathLike, out_dir: str | os.PathLike, *, size: str = "S", steps: int = 1000,
                  batch_videos: int = 8, lr: float = 2e-3, warmup_ratio: float = 0.05, weight_decay: float = 0.01,
                  seed: int = 0, device: str | torch.device = "cpu", eval_every: int = 0, eval_videos: int = 50,
                  tokenizer: str = "word", tokens_per_frame: int = 16, captions: bool = False, blind: bool = False,
                  packed: bool = True, vision_warmup_steps: int = 0, progress: bool = True) -> str:
    """Train a toy VLM on ``world_dir/train.jsonl`` with the video in context; save it.

    Args:
        world_dir: a `generate_world` folder (train.jsonl, and val.jsonl for the evaluations).
        out_dir: where the model, tokenizer, preprocessor and ``toy_vlm.json`` go.
        size: `TOY_SHAPES` key.
        steps: optimizer steps.
        batch_videos: videos per step, each with all its question rows.
        lr, warmup_ratio, weight_decay: AdamW and its cosine schedule with linear warm-up.
        seed: initialisation and data order.
        device: where to train.
        eval_every: in-context accuracy on the first ``eval_videos`` val videos every so many
            steps, logged to ``metrics.jsonl`` with the training seconds so far (0: only at the end).
        eval_videos: val videos per evaluation (all of them at the end).
        tokenizer: `TOKENIZERS` key (``"word"``: the world's word-level tokenizer; ``"char"``:
            the character-level one).
        tokens_per_frame: ``<image>`` tokens per frame (`TOKENS_PER_FRAME`).
        captions: train on each video's caption row as well as its questions.
        blind: train each question without the video as well (text-only template).
        packed: one row per video holding all its questions as turns (`in_context_batch`), in
            an order drawn per step; False: one row per question (each re-reads the video).
        vision_warmup_steps: steps of `warm_up_vision` first (the vision tower and connector
            pretrained on the clips' scene labels; 0: none), which then stay frozen while the
            decoder learns (trained on at ``lr`` they lost what the warm-up taught: in-context
            size accuracy 47 % instead of 82 % after 2000 steps, bench/NOTES.md); frozen, each
            video's tokens are made once (`video_features`) instead of at every step. The probe's
            validation metrics go to ``metrics.jsonl`` and ``toy_vlm.json``.
        progress: tqdm bar with the loss.

    Returns:
        ``out_dir``.
    """
    device = _check_args(world_dir, steps, batch_videos, lr, warmup_ratio, eval_every, vision_warmup_steps, device)
    from transformers import get_cosine_schedule_with_warmup

    world_dir, out_dir = os.fspath(world_dir), os.fspath(out_dir)
    vlm = build_toy_vlm(size, seed=seed, tokenizer=tokenizer, tokens_per_frame=tokens_per_frame)
    vlm.model.to(device).train()
    train = load_questions(os.path.join(world_dir, "train.jsonl"), vlm,
                           task_types=("qa", "caption") if captions else ("qa",))
    val_path = os.path.join(world_dir, "val.jsonl")
    val = load_questions(val_path, vlm) if os.path.isfile(val_path) else []
    warmup = None
    if vision_warmup_steps:
        warmup = warm_up_vision(vlm, train, steps=vision_warmup_steps, seed=seed, val=val, progress=progress)
        for param in vision_parameters(vlm):  # kept as pretrained (see vision_warmup_steps above)
            param.requires_grad_(False)
    # frozen, the tower gives each video the same tokens at every step: made once (`video_features`)
    tokens = video_features(vlm, [video for video, _ in train], progress=progress) if warmup is not None else None
    token_rows = ConversationIds(vlm.tokenizer)  # the rows' ids from pieces tokenized once
    optimizer = torch.optim.AdamW([p for p in vlm.model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(steps * warmup_ratio), steps)
    os.makedirs(out_dir, exist_ok=True)
    order, position, loss_value, seconds = np.array([], dtype=np.int64), 0, float("nan"), 0.0
    epoch = 0
    with open(os.path.join(out_dir, METRICS_FILE), "w", encoding="utf-8") as metrics, \
            tqdm(range(1, steps + 1), desc="toy VLM", disable=not progress) as bar:
        if warmup is not None:
            metrics.write(json.dumps({"vision_warmup": warmup}) + "\n")
        for step in bar:
            started = time.perf_counter()
            while len(order) - position < batch_videos:
                order = np.concatenate([order[position:], np.random.default_rng([seed, epoch]).permutation(len(train))])
                position, epoch = 0, epoch + 1
            indices = order[position:position + batch_videos].tolist()
            picked = [train[i] for i in indices]
            position += batch_videos
            rows = [(v, row) for v, (_, group) in enumerate(picked) for row in group]
            if packed:  # one row per video, its questions in an order drawn per step
                shuffle = np.random.default_rng([seed, step])
                conversations = [[(group[k].prompt, group[k].target_text) for k in shuffle.permutation(len(group))]
                                 for _, group in picked]
                row_video = list(range(len(picked)))
            else:
                conversations = [[(r.prompt, r.target_text)] for _, r in rows]
                row_video = [v for v, _ in rows]
            batch = in_context_batch(vlm, [video for video, _ in picked], conversations, row_video,
                                     features=None if tokens is None else [tokens[i] for i in indices],
                                     token_rows=token_rows)
            loss = in_context_loss(vlm.model, batch)
            questions = [r for _, r in rows if r.task_type == "qa"]
            if blind and questions:
                text_only = student_batch(vlm.tokenizer, [r.prompt for r in questions],
                                          [r.target_text for r in questions], [0] * len(questions))
                loss = (loss * len(row_video) + answer_loss(vlm.model, text_only.to(device)) * len(questions)) / (
                    len(row_video) + len(questions))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vlm.model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            seconds += time.perf_counter() - started
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if val and eval_every and step % eval_every == 0 and step < steps:
                accuracy = in_context_accuracy(vlm, val[:eval_videos])
                metrics.write(json.dumps({"step": step, "train_seconds": round(seconds, 1), "loss": loss_value,
                                          "val_accuracy": accuracy}) + "\n")
                metrics.flush()
        final = in_context_accuracy(vlm, val) if val else None
        metrics.write(json.dumps({"step": steps, "train_seconds": round(seconds, 1), "loss": loss_value,
                                  "val_accuracy": final}) + "\n")
    vlm.model.eval()
    save_toy_vlm(vlm, out_dir)
    info = {"size": size, "tokenizer": tokenizer, "tokens_per_frame": tokens_per_frame, "captions": captions,
            "blind": blind, "packed": packed, "vision_warmup": warmup, "steps": steps,
            "batch_videos": batch_videos, "lr": lr,
            "warmup_ratio": warmup_ratio, "weight_decay": weight_decay, "seed": seed,
            "world_dir": os.path.abspath(world_dir),
            "train_videos": len(train), "final_loss": loss_value, "train_seconds": round(seconds, 1),
            "val_accuracy": final}
    with open(os.path.join(out_dir, TOY_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return out_dir

