"""Batches of videos with their questions, decoded in DataLoader worker processes.

In training several questions about one video share that video's adapter, so the unit of a
batch is a video: `VideoQADataset` groups a manifest's rows by video file (first appearance
order) and, with ``max_questions_per_video``, splits a video's rows into consecutive chunks of
at most that many (every row is used once per epoch; a long list costs extra decodes, never
dropped rows). Each item is decoded (`read_video`) and each batch preprocessed
(`build_video_batch`: the internalisation prompt, pixels) inside the worker that loads it.

A video that cannot be read never surfaces as a worker traceback: the worker hands the error
back with the batch, and `VideoQALoader` raises it in the main process as one line naming the
video file and the row ids, or (``skip_bad_rows``) drops that video and lists it in the
batch's ``skipped``.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from v2l_fast.api import pad_id
from v2l_fast.data.manifest import ManifestRow
from v2l_fast.errors import fail
from v2l_fast.vlm.frames import DEFAULT_INSTRUCTION, VideoBatch, VideoPreprocessor, build_video_batch
from v2l_fast.vlm.load import VLM
from v2l_fast.vlm.video import Video, VideoError, read_video


def describe_rows(rows: Sequence[ManifestRow]) -> str:
    """``FILE:LINE (id 'x')`` of the first row, plus how many more rows share the video."""
    first = rows[0]
    more = f" and {len(rows) - 1} more row{'s' if len(rows) > 2 else ''}" if len(rows) > 1 else ""
    return f"{first.source or 'manifest'} (id {first.id!r}{more})"


def worker_start_method(num_workers: int) -> str | None:
    """How DataLoader workers start: ``"forkserver"`` where the platform has it, None without workers.

    Workers forked from a process that has decoded a video with PyAV 18.1.1 hang in their first
    decode (measured 2026-12-07; 18.1.0 does not; the cause inside PyAV is not known). Workers
    started from the fork server, a fresh process that never decoded, do not depend on it; they
    import the loader's modules once per worker (~2 s) instead of inheriting them.
    """
    if not num_workers or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    return "forkserver"


@dataclass
class _Item:
    rows: tuple[ManifestRow, ...]
    video: Video | None
    error: str | None


class VideoQADataset(Dataset):
    """Videos of a manifest, each with its rows; item i is decoded when it is loaded.

    Args:
        rows: manifest rows (`read_manifest`), several may share a video file.
        preprocessor: the VLM's `VideoPreprocessor` (frames kept per video, sampling rate).
        max_questions_per_video: split a video's rows into chunks of at most this many
            (None: all of a video's rows in one item).
    """

    def __init__(self, rows: Sequence[ManifestRow], preprocessor: VideoPreprocessor, *,
                 max_questions_per_video: int | None = None):
        if not rows:
            fail("rows", "at least one manifest row", "none")
        if max_questions_per_video is not None and (not isinstance(max_questions_per_video, int)
                                                    or max_questions_per_video < 1):
            fail("max_questions_per_video", "a positive int or None", repr(max_questions_per_video))
        groups: dict[str, list[ManifestRow]] = {}
        for row in rows:
            groups.setdefault(row.video_file, []).append(row)
        size = max_questions_per_video or max(map(len, groups.values()))
        self.items = [tuple(group[i:i + size]) for group in groups.values() for i in range(0, len(group), size)]
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Item:
        rows = self.items[index]
        try:
            video = read_video(rows[0].video_file, max_frames=self.preprocessor.max_frames,
                               target_fps=self.preprocessor.fps)
        except VideoError as err:
            return _Item(rows, None, f"{describe_rows(rows)}: video_path: {err}")
        return _Item(rows, video, None)


@dataclass
class VideoQABatch:
    """K videos as one `VideoBatch` (the internalisation inputs) and, per video, its rows.

    ``videos`` is None when every video of the batch was skipped; ``skipped`` holds the
    one-line reasons of the videos left out (only with ``skip_bad_rows``).
    """

    videos: VideoBatch | None
    rows: list[tuple[ManifestRow, ...]]
    skipped: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[list[str]]:
        """Row ids, one list per video."""
        return [[row.id for row in rows] for rows in self.rows]

    @property
    def prompts(self) -> list[list[str]]:
        """Questions, one list per video."""
        return [[row.prompt for row in rows] for rows in self.rows]

    @property
    def targets(self) -> list[list[str]]:
        """Target answers, one list per video."""
        return [[row.target_text for row in rows] for rows in self.rows]


class _Collate:
    """Build the batch inside the worker: the internalisation prompt and pixels of each video."""

    def __init__(self, tokenizer, preprocessor: VideoPreprocessor, instruction: str):
        self.tokenizer, self.preprocessor, self.instruction = tokenizer, preprocessor, instruction

    def __call__(self, items: list[_Item]) -> VideoQABatch:
        good = [item for item in items if item.video is not None]
        videos = None
        if good:
            videos = build_video_batch([item.video for item in good], self.instruction, self.tokenizer,
                                       self.preprocessor, pad_token_id=pad_id(self.tokenizer))
        return VideoQABatch(videos, [item.rows for item in good], [item.error for item in items if item.error])


class VideoQALoader:
    """Iterate a manifest's videos in batches (`VideoQABatch`), decoded in worker processes.

    Args:
        rows: manifest rows (`read_manifest`).
        vlm: the `VLM` whose tokenizer and `VideoPreprocessor` build the inputs (the model
            itself is not sent to the workers).
        instruction: the internalisation text after the video (spec §2 default).
        videos_per_batch: K, videos per batch.
        max_questions_per_video: rows per video item (see `VideoQADataset`).
        shuffle: draw the video order from a generator seeded with ``seed`` (each pass a new
            order; the same sequence of orders for the same seed, whatever ``num_workers``).
        num_workers: DataLoader worker processes (0: decode in this process).
        skip_bad_rows: leave out videos that cannot be read (listed in ``skipped``) instead
            of raising `VideoError`.
    """

    def __init__(self, rows: Sequence[ManifestRow], *, vlm: VLM, instruction: str = DEFAULT_INSTRUCTION,
                 videos_per_batch: int = 1, max_questions_per_video: int | None = None, shuffle: bool = False,
                 seed: int = 0, num_workers: int = 0, skip_bad_rows: bool = False):
        for name, value, least in (("videos_per_batch", videos_per_batch, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < least:
                fail(name, f"an int >= {least}", repr(value))
        self.dataset = VideoQADataset(rows, vlm.preprocessor, max_questions_per_video=max_questions_per_video)
        self.skip_bad_rows = skip_bad_rows
        self.loader = DataLoader(self.dataset, batch_size=videos_per_batch, shuffle=shuffle,
                                 generator=torch.Generator().manual_seed(seed) if shuffle else None,
                                 num_workers=num_workers, multiprocessing_context=worker_start_method(num_workers),
                                 collate_fn=_Collate(vlm.tokenizer, vlm.preprocessor, instruction))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[VideoQABatch]:
        for batch in self.loader:
            if batch.skipped and not self.skip_bad_rows:
                raise VideoError(batch.skipped[0])
            yield batch
