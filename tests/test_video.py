"""Video decoding and frame sampling: real files written with PyAV, bad files, decoded frames."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from v2l_fast.testing import write_test_video
from v2l_fast.vlm.video import Video, VideoError, read_video, sample_frame_indices, write_video


@pytest.mark.parametrize(
    "total, fps, max_frames, target_fps, expected",
    [
        (5, 4.0, 12, 1.0, [0]),  # 1.25 s → round(1.25) = 1 frame
        (40, 4.0, 12, 1.0, np.linspace(0, 39, 10, dtype=int)),  # 10 s → 10 frames, no skip
        # 60 s at 10 fps: 60 − 2 > 12 → drop one second at each end, 12 frames
        (600, 10.0, 12, 1.0, np.linspace(10, 590, 12, dtype=int)),
        (3, 30.0, 12, 1.0, [0]),  # under a second still gives one frame
        (10, 2.0, 3, 2.0, np.unique(np.linspace(0, 9, 3, dtype=int))),
        (4, 1.0, 12, 4.0, [0, 1, 2, 3]),  # more wanted than frames: duplicates removed
    ],
)
def test_sample_frame_indices_follow_the_spec(total, fps, max_frames, target_fps, expected):
    got = sample_frame_indices(total, fps, max_frames=max_frames, target_fps=target_fps)
    np.testing.assert_array_equal(got, expected)


def test_sample_frame_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_frames"):
        sample_frame_indices(0, 4.0)
    with pytest.raises(ValueError, match="native_fps"):
        sample_frame_indices(10, 0.0)
    with pytest.raises(ValueError, match="max_frames"):
        sample_frame_indices(10, 4.0, max_frames=0)


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_read_video_samples_frames_and_timestamps(tmp_path, codec):
    path = tmp_path / f"clip_{codec}.mp4"
    written = write_test_video(path, num_frames=12, fps=4, codec=codec, seed=1)  # 3 s
    video = read_video(path, max_frames=12, target_fps=1.0)
    assert video.frames.shape == (3, 32, 48, 3) and video.frames.dtype == np.uint8
    assert video.timestamps == (0.0, 5 / 4, 11 / 4)  # indices linspace(0, 11, 3) = 0, 5, 11
    assert video.duration == 3.0
    assert video.source == str(path)
    # Lossy codec: the decoded frames are close to what was written, frame for frame.
    for got, index in zip(video.frames, (0, 5, 11)):
        err = np.abs(got.astype(float) - written[index]).mean()
        others = min(np.abs(got.astype(float) - written[j]).mean() for j in range(12) if j != index)
        assert err < others


def test_read_video_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match="not found.*nope.mp4"):
        read_video(missing)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty.*empty.mp4"):
        read_video(empty)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(VideoError, match="corrupt.mp4"):
        read_video(corrupt)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match="notes.mp4"):
        read_video(text)
    assert issubclass(VideoError, ValueError)


def test_read_video_truncated_file_errors_or_keeps_decodable_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    write_test_video(path, num_frames=8, fps=4)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(path.read_bytes()[:200])  # header only: the moov atom is cut
    with pytest.raises(VideoError, match="truncated.mp4"):
        read_video(truncated)


def test_video_from_frames_array_and_pil():
    frames = np.random.default_rng(0).integers(0, 256, (3, 10, 14, 3), dtype=np.uint8)
    video = Video.from_frames(frames, fps=2.0)
    np.testing.assert_array_equal(video.frames, frames)
    assert video.timestamps == (0.0, 0.5, 1.0) and video.duration == 1.5
    pil = Video.from_frames([Image.fromarray(f) for f in frames])
    np.testing.assert_array_equal(pil.frames, frames)
    assert pil.timestamps[1] == 1 / 24  # transformers' fallback rate for frames without one


def test_video_from_frames_rejects_bad_frames():
    with pytest.raises(VideoError, match="no frames"):
        Video.from_frames([])
    with pytest.raises(VideoError, match=r"frame 0.*uint8"):
        Video.from_frames(np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(VideoError, match="differ in size"):
        Video.from_frames([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)])
    with pytest.raises(VideoError, match="frame 1"):
        Video.from_frames([np.zeros((4, 4, 3), np.uint8), "frame.png"])
    with pytest.raises(ValueError, match="fps"):
        Video.from_frames(np.zeros((1, 4, 4, 3), np.uint8), fps=0)


def test_write_video_round_trip_and_bad_frames(tmp_path):
    frames = np.zeros((5, 32, 48, 3), dtype=np.uint8)
    frames[:, :, :24] = 200
    write_video(tmp_path / "clip.mp4", frames, fps=5)
    video = read_video(tmp_path / "clip.mp4", max_frames=12, target_fps=5.0)
    assert video.frames.shape == (5, 32, 48, 3) and video.duration == pytest.approx(1.0)
    assert abs(video.frames[2, 16, 5, 0].astype(int) - 200) < 20 and video.frames[2, 16, 40, 0] < 20
    with pytest.raises(ValueError, match="^frames: expected"):
        write_video(tmp_path / "bad.mp4", frames.astype(np.float32), fps=5)
