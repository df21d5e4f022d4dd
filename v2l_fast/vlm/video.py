"""Video decoding (PyAV) and SmolVLM2's frame sampling, without torchvision.

`sample_frame_indices` is the sampling rule of docs/method.md §2 (SmolVLM2's processor):
n = min(round(fps_t · duration), max_frames) frames (at least one), one second dropped at each
end when the clip is long enough, indices an integer ``linspace`` with duplicates removed.
`read_video` decodes a file and keeps those frames; `Video.from_frames` wraps frames that are
already decoded. Every failure to read a file is a `VideoError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from v2l_fast.errors import fail

# transformers' fallback frame rate for frames that come without one (SmolVLM processor).
DEFAULT_FRAMES_FPS = 24.0


class VideoError(ValueError):
    """A video that cannot be read or used: missing, empty, corrupt, or without frames."""


@dataclass(frozen=True)
class Video:
    """Sampled RGB frames of one clip with their timestamps.

    Attributes:
        frames: ``[F, H, W, 3]`` uint8 RGB frames, F ≥ 1.
        timestamps: ``F`` times in seconds (frame index / native fps).
        duration: clip length in seconds (total frames / native fps).
        source: where the frames came from (a path, or ``"<frames>"``), for messages.
    """

    frames: np.ndarray
    timestamps: tuple[float, ...]
    duration: float
    source: str = "<frames>"

    @classmethod
    def from_frames(cls, frames: Sequence | np.ndarray, *, fps: float = DEFAULT_FRAMES_FPS,
                    source: str = "<frames>") -> Video:
        """Frames already decoded and sampled: a list of PIL images or ``[F, H, W, 3]`` uint8.

        All frames are used, in order. Frame i gets timestamp ``i / fps`` and the clip lasts
        ``F / fps`` seconds; ``fps`` defaults to 24, the value SmolVLM2's processor assumes
        for frames without metadata.
        """
        if not isinstance(fps, (int, float)) or not fps > 0:
            fail("fps", "a positive number", repr(fps))
        arrays = [_to_rgb_array(frame, i, source) for i, frame in enumerate(frames)]
        if not arrays:
            raise VideoError(f"{source}: no frames given")
        if len({a.shape for a in arrays}) != 1:
            raise VideoError(f"{source}: frames differ in size: {sorted({a.shape for a in arrays})}")
        stacked = np.stack(arrays)
        return cls(stacked, tuple(i / fps for i in range(len(arrays))), len(arrays) / fps, source)


def _to_rgb_array(frame, index: int, source: str) -> np.ndarray:
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise VideoError(f"{source}: frame {index}: expected a uint8 array [H, W, 3], got "
                             f"{frame.dtype} array of shape {list(frame.shape)}")
        return frame
    if hasattr(frame, "convert") and hasattr(frame, "size"):  # a PIL image
        return np.asarray(frame.convert("RGB"))
    raise VideoError(f"{source}: frame {index}: expected a PIL image or a uint8 array [H, W, 3], "
                     f"got {type(frame).__name__}")


def sample_frame_indices(total_frames: int, native_fps: float, *, max_frames: int = 12,
                         target_fps: float = 1.0, skip_secs: float = 1.0) -> np.ndarray:
    """Indices of the frames SmolVLM2's processor keeps from a clip (docs/method.md §2).

    Args:
        total_frames: frames in the clip (≥ 1).
        native_fps: the clip's frame rate.
        max_frames: most frames to keep (the spec's 12).
        target_fps: frames per second to aim for (the processor's ``video_sampling.fps``).
        skip_secs: seconds dropped at each end when ``duration − 2·skip_secs`` exceeds
            ``max_frames · target_fps``.
    """
    if total_frames < 1:
        fail("total_frames", "at least 1", total_frames)
    if not native_fps > 0:
        fail("native_fps", "a positive frame rate", native_fps)
    if max_frames < 1:
        fail("max_frames", "at least 1", max_frames)
    duration = total_frames / native_fps
    wanted = max(min(int(round(target_fps * duration)), max_frames), 1)
    start, end = 0, total_frames - 1
    if skip_secs > 0 and duration - 2 * skip_secs > max_frames * target_fps:
        start = int(skip_secs * native_fps)
        end = int(total_frames - skip_secs * native_fps)
    start, end = max(0, start), min(end, total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return np.unique(np.linspace(start, end, wanted, dtype=int))


def read_video(path: str | os.PathLike, *, max_frames: int = 12, target_fps: float = 1.0) -> Video:
    """Decode ``path`` with PyAV and keep the frames `sample_frame_indices` picks.

    The frame count and rate come from the container (as transformers' PyAV loader reads
    them); when the container does not state the count, or states more frames than decode,
    the frames are counted by decoding. Raises `VideoError` naming the file when it is
    missing, empty, corrupt, has no video stream, or yields no frame.
    """
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(f"video file not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise VideoError(f"video file is empty (0 bytes): {path!r}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"no video stream in {path!r}")
            stream = container.streams.video[0]
            native_fps = float(stream.average_rate or stream.guessed_rate or 0)
            if native_fps <= 0:
                raise VideoError(f"cannot read the frame rate of {path!r}")
            total = stream.frames
    except av.error.FFmpegError as err:
        raise VideoError(f"cannot read video {path!r}: {err}") from err
    if total <= 0:
        total = _decode(path, None)[0]
    if total <= 0:
        raise VideoError(f"no frames could be decoded from {path!r}")
    indices = sample_frame_indices(total, native_fps, max_frames=max_frames, target_fps=target_fps)
    decoded, frames = _decode(path, set(indices.tolist()))
    if len(frames) < len(indices):  # the container over-stated its frame count
        if decoded == 0:
            raise VideoError(f"no frames could be decoded from {path!r}")
        total = decoded
        indices = sample_frame_indices(total, native_fps, max_frames=max_frames, target_fps=target_fps)
        frames = _decode(path, set(indices.tolist()))[1]
    timestamps = tuple(float(i) / native_fps for i in indices)
    return Video(np.stack(frames), timestamps, total / native_fps, path)


def _decode(path: str, keep: set[int] | None) -> tuple[int, list[np.ndarray]]:
    """Decode every frame of the first video stream; return (count, RGB frames at ``keep``)."""
    import av

    count, frames = 0, []
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                if keep is not None and count in keep:
                    frames.append(frame.to_ndarray(format="rgb24"))
                count += 1
    except av.error.FFmpegError as err:
        if count == 0:
            raise VideoError(f"cannot decode video {path!r}: {err}") from err
        # A damaged tail: keep the frames decoded so far, as players do.
    return count, frames


def write_video(path: str | os.PathLike, frames: np.ndarray, *, fps: int, codec: str = "mpeg4") -> None:
    """Encode uint8 RGB frames ``[F, H, W, 3]`` into ``path`` with PyAV (yuv420p, ``fps``)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        fail("frames", "a non-empty uint8 array [F, H, W, 3]", f"{frames.dtype} array of shape {list(frames.shape)}")
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
