"""`v2l_fast.testing`: the relative-error helpers of the design card and the random test videos."""

from __future__ import annotations

import pytest
import torch

from v2l_fast.testing import REL_TOLERANCE, assert_rel_close, rel_error, write_test_video
from v2l_fast.vlm import read_video


def test_rel_error_and_assert():
    ref = torch.ones(10)
    assert rel_error(ref * 1.01, ref) == pytest.approx(0.01)
    assert rel_error(torch.full((10,), float("nan")), ref) == float("inf")
    assert rel_error(torch.ones(3), ref) == float("inf")
    assert_rel_close(ref + 1e-6, ref, torch.float32)
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(ref * 1.01, ref, torch.float32)


def test_tolerance_follows_the_dtype_of_the_output():
    ref = torch.ones(100)
    assert_rel_close((ref * (1 + 1e-3)).half(), ref.half())  # within fp16's 2e-3
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(ref * (1 + 1e-3), ref)  # beyond fp32's 1e-4
    assert REL_TOLERANCE[torch.bfloat16] == 1e-2


def test_test_video_decodes_to_its_frame_count(tmp_path):
    frames = write_test_video(tmp_path / "clip.mp4", num_frames=5, fps=5, size=(32, 48), seed=2)
    assert frames.shape == (5, 32, 48, 3)
    video = read_video(tmp_path / "clip.mp4", max_frames=12, target_fps=5.0)
    assert video.frames.shape == (5, 32, 48, 3)
