"""Offline teacher targets (docs/method.md §7): the frozen VLM answers each row with the video in
its context, and the answers become the rows' ``target_text`` in a new manifest.

As the authors' ``generate_finevideo_teacher_targets.py``: one user turn ``[video, prompt]`` in
the processor's video template with the generation prompt on, the frames sampled as for
internalisation (12, longest edge 384), left padding, greedy, 64 new tokens, batch 8; the new
tokens decoded without special tokens and stripped, an empty answer replaced by
``"Unable to determine."``; ``metadata`` gains ``teacher_model``, ``teacher_generated``,
``teacher_prompt`` and ``teacher_max_new_tokens``.

Resumable: every finished batch is appended to ``OUT.partial.jsonl`` and fsynced. A new run
reads that file (cutting off a torn last line), skips the ids it holds and goes on; at the end
the manifest is written atomically (temporary file + rename) in input order and the partial
file removed. A run killed at any point and started again therefore ends with every row
exactly once, and OUT is never half-written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from v2l_fast.api import greedy_answers, left_pad, pad_id
from v2l_fast.data.loader import describe_rows
from v2l_fast.data.manifest import ManifestRow, fsync_folder, read_manifest, row_line, write_manifest
from v2l_fast.errors import fail
from v2l_fast.vlm.features import image_tokens, video_rows_embeds
from v2l_fast.vlm.frames import pad_frames, render_video_chat, video_turn
from v2l_fast.vlm.load import VLM
from v2l_fast.vlm.video import Video, VideoError, read_video

EMPTY_ANSWER = "Unable to determine."
PARTIAL_SUFFIX = ".partial.jsonl"


@dataclass
class TeacherReport:
    """What `make_teacher_targets` did: rows written, rows found already done, rows left out."""

    written: int
    resumed: int
    skipped: list[str] = field(default_factory=list)


def partial_path(manifest_out: str | os.PathLike) -> str:
    """The file finished rows are appended to while ``manifest_out`` is being made."""
    return os.fspath(manifest_out) + PARTIAL_SUFFIX


def teacher_prompt(video: Video, prompt: str, vlm: VLM) -> str:
    """One user turn ``[video, prompt]`` in the video chat template, generation prompt on."""
    return render_video_chat(vlm.tokenizer, video_turn(prompt), vlm.preprocessor.video_text(video),
                             generation_prompt=True)


@torch.no_grad()
def video_answers(videos: Sequence[Video], prompts: Sequence[str], vlm: VLM, *, max_new_tokens: int) -> list[str]:
    """The VLM's greedy answers to ``[videos[i], prompts[i]]`` in one ``generate`` call: the
    teacher's prompt (`teacher_prompt`), left padding; decoded without special tokens and
    stripped (an empty answer stays empty).

    A video that appears more than once (the same object: a video's questions) is preprocessed
    and run through the vision tower once, its ``<image>`` tokens shared by its rows
    (`video_rows_embeds`, passed to ``generate`` as ``inputs_embeds``) instead of the tower
    running once per row: the same answers (checked on 96 held-out toy questions, and in the
    tests), and on SmolVLM2 the tower is most of a row's prefill (12 frames of 1024 patches
    through SigLIP against 768 context tokens through the 256M's decoder).
    """
    unique = list({id(video): video for video in videos}.values())
    index = {id(video): i for i, video in enumerate(unique)}
    pixel_values, pixel_mask = pad_frames([vlm.preprocessor.pixel_values(video) for video in unique],
                                          vlm.preprocessor.max_image_size)
    tokens = image_tokens(vlm.model, pixel_values, pixel_mask)
    tokenizer, pad = vlm.tokenizer, pad_id(vlm.tokenizer)
    ids = [tokenizer(teacher_prompt(video, prompt, vlm), add_special_tokens=False)["input_ids"]
           for video, prompt in zip(videos, prompts)]
    input_ids, attention_mask = left_pad(ids, pad, vlm.device)
    embeds = video_rows_embeds(vlm.model, input_ids, tokens, [index[id(video)] for video in videos])
    return greedy_answers(vlm.model, None, input_ids, attention_mask, max_new_tokens, pad, tokenizer.eos_token_id,
                          tokenizer, inputs_embeds=embeds)


def make_teacher_targets(manifest_in: str | os.PathLike, manifest_out: str | os.PathLike, *, vlm: VLM,
                         batch_size: int = 8, max_new_tokens: int = 64, max_frames: int = 12,
                         data_root: str | os.PathLike | None = None, skip_bad_rows: bool = False,
                         overwrite: bool = False, teacher_name: str | None = None,
                         progress: bool = True) -> TeacherReport:
    """Fill every row's ``target_text`` with the VLM's greedy answer to [video, prompt].

    Args:
        manifest_in: the manifest to answer (``target_text`` may be empty or absent).
        manifest_out: the manifest to write (rows in input order).
        vlm: the frozen teacher `VLM` (run on its own device and dtype).
        batch_size: rows per ``generate`` call.
        max_new_tokens: greedy answer length limit (the authors' 64).
        max_frames: frames sampled per video (the authors' 12).
        data_root: folder relative video paths are resolved against (None: the input
            manifest's folder; relative paths are then rewritten relative to the output's).
        skip_bad_rows: leave out bad rows and unreadable videos (reported) instead of failing.
        overwrite: replace an existing ``manifest_out`` (never needed to resume).
        teacher_name: recorded as ``metadata.teacher_model`` (None: the model's ``name_or_path``).
        progress: show a tqdm bar over batches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        fail("batch_size", "a positive int", repr(batch_size))
    manifest_out = os.fspath(manifest_out)
    partial = partial_path(manifest_out)
    if os.path.isdir(manifest_out):
        fail("manifest_out", "a file path", f"the folder {manifest_out!r}")
    if os.path.exists(manifest_out) and not os.path.exists(partial) and not overwrite:
        fail("manifest_out", "a file that does not exist yet (or overwrite)", f"{manifest_out!r}, which exists")
    out_dir = os.path.dirname(os.path.abspath(manifest_out))
    if not os.path.isdir(out_dir):
        fail("manifest_out", "a file in an existing folder", f"{manifest_out!r}, whose folder does not exist")
    rows, bad = read_manifest(manifest_in, data_root=data_root, skip_bad_rows=skip_bad_rows)
    if data_root is None:
        rows = [_relocate(row, out_dir) for row in rows]
    settings = dict(max_new_tokens=max_new_tokens, max_frames=max_frames,
                    name=teacher_name or getattr(vlm.model, "name_or_path", "") or type(vlm.model).__name__)
    done = _read_partial(partial, {row.id: row for row in rows}, out_dir,
                         {"teacher_model": settings["name"], "teacher_max_new_tokens": max_new_tokens})
    resumed = len(done)
    skipped = [str(reason) for reason in bad]
    # Rows of one task type share a batch: a caption row would make a batch of one-word answers
    # generate to the caption's length (output order is the input order whatever the batches).
    todo = sorted((row for row in rows if row.id not in done), key=lambda row: row.task_type)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    with open(partial, "a", encoding="utf-8") as sink:
        fsync_folder(out_dir)
        for batch in tqdm(batches, desc="teacher", disable=not progress):
            answered, failed = _answer(batch, vlm, **settings)
            if failed and not skip_bad_rows:
                raise VideoError(failed[0])
            skipped += failed
            sink.write("".join(row_line(row) for row in answered))
            sink.flush()
            os.fsync(sink.fileno())
            done.update((row.id, row) for row in answered)
    write_manifest([done[row.id] for row in rows if row.id in done], manifest_out)
    os.remove(partial)
    return TeacherReport(written=sum(row.id in done for row in rows), resumed=resumed, skipped=skipped)


def _relocate(row: ManifestRow, out_dir: str) -> ManifestRow:
    """The row with a relative ``video_path`` rewritten to resolve from ``out_dir``."""
    if os.path.isabs(os.path.expanduser(row.video_path)):
        return row
    return replace(row, video_path=os.path.relpath(row.video_file, out_dir))


def _read_partial(partial: str, inputs: dict[str, ManifestRow], out_dir: str,
                  teacher: dict) -> dict[str, ManifestRow]:
    """Rows a previous run finished: the partial file without its torn tail, checked against
    the input (same ids and prompts) and this run's ``teacher`` metadata, by id."""
    if not os.path.exists(partial):
        return {}
    with open(partial, "rb+") as handle:
        content = handle.read()
        whole = content.rfind(b"\n") + 1  # a line without its newline was torn by a kill
        if whole < len(content):
            handle.truncate(whole)
            handle.flush()
            os.fsync(handle.fileno())
    if not content[:whole].strip():
        return {}
    rows = read_manifest(partial, data_root=out_dir, require_targets=True, check_videos=False).rows
    for row in rows:
        source = inputs.get(row.id)
        if source is None or source.prompt != row.prompt:
            fail(f"{row.source}: id", "a row of the input manifest (the partial file of another run?)",
                 f"{row.id!r}, which " + ("is not in the input" if source is None else "has another prompt there"))
        for key, value in teacher.items():
            if row.metadata.get(key) != value:
                fail(f"{row.source}: metadata.{key}", f"{value!r}, as this run (resume with the same settings)",
                     repr(row.metadata.get(key)))
    return {row.id: row for row in rows}


@torch.no_grad()
def _answer(rows: Sequence[ManifestRow], vlm: VLM, *, max_new_tokens: int, max_frames: int,
            name: str) -> tuple[list[ManifestRow], list[str]]:
    """Answer a batch of rows: (rows with their targets, reasons of the rows left out)."""
    videos: dict[str, Video] = {}
    errors: dict[str, str] = {}
    for row in rows:
        if row.video_file not in videos and row.video_file not in errors:
            try:
                videos[row.video_file] = read_video(row.video_file, max_frames=max_frames,
                                                    target_fps=vlm.preprocessor.fps)
            except VideoError as err:
                errors[row.video_file] = str(err)
    good = [row for row in rows if row.video_file in videos]
    reasons = [f"{describe_rows([row])}: video_path: {errors[row.video_file]}"
               for row in rows if row.video_file in errors]
    if not good:
        return [], reasons
    answers = video_answers([videos[row.video_file] for row in good], [row.prompt for row in good], vlm,
                            max_new_tokens=max_new_tokens)
    out = []
    for row, answer in zip(good, answers):
        metadata = dict(row.metadata, teacher_model=name, teacher_generated=True, teacher_prompt=row.prompt,
                        teacher_max_new_tokens=max_new_tokens)
        out.append(replace(row, target_text=answer or EMPTY_ANSWER, metadata=metadata))
    return out, reasons
