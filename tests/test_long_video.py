"""Long videos (v2l_fast.long_video) on tiny random models: segments, composition, re-compression,
bad input, and ``v2l-fast internalize --segments/--max-rank``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from cli_run import run

import v2l_fast
from v2l_fast.adapters import Adapters
from v2l_fast.hypernet import save_frames2lora
from v2l_fast.hypernet.compose import combine_lora
from v2l_fast.long_video import compose_segments, internalize_long, segment_bounds, split_video
from v2l_fast.testing import assert_rel_close, tiny_hypernet, write_test_video
from v2l_fast.vlm import LoRAPatch, down_proj_targets
from v2l_fast.vlm.factory import tiny_smolvlm_tokenizer, tiny_vlm
from v2l_fast.vlm.video import Video


@pytest.fixture(scope="module")
def session():
    vlm = tiny_vlm(seed=7, longest_edge=64, max_frames=3)
    return v2l_fast.Session(vlm, tiny_hypernet(vlm.model))


def frames(n, seed, size=(24, 36)):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def delta(adapters: Adapters) -> torch.Tensor:
    """ΔW / α per video and layer, ``[n, L, H, I]``, in fp64."""
    return adapters.B.double().mT @ adapters.A.double()


def long(session, videos, **kwargs) -> Adapters:
    return internalize_long(videos, vlm=session.vlm, hypernet=session.hypernet, **kwargs)


# --- splitting ------------------------------------------------------------------------------------

def test_segment_bounds():
    assert segment_bounds(10) == [(0, 10)]
    assert segment_bounds(10, segments=3) == [(0, 4), (4, 7), (7, 10)]
    assert segment_bounds(10, segments=10) == [(i, i + 1) for i in range(10)]
    assert segment_bounds(10, segment_frames=4) == [(0, 4), (4, 8), (8, 10)]
    assert segment_bounds(3, segment_frames=8) == [(0, 3)]


def test_split_video_rebases_time():
    video = Video.from_frames(frames(6, 0), fps=2)
    parts = split_video(video, segment_bounds(6, segments=2))
    assert [len(p.frames) for p in parts] == [3, 3]
    assert parts[1].timestamps == (0.0, 0.5, 1.0) and parts[1].duration == pytest.approx(1.5)
    np.testing.assert_array_equal(parts[1].frames, video.frames[3:])
    assert parts[1].source.endswith("[frames 3:6]")


@pytest.mark.parametrize("kwargs,message", [
    (dict(segments=3, segment_frames=2), "segments: expected either segments or segment_frames, not both"),
    (dict(segments=0), "segments: expected a positive int, got 0"),
    (dict(segments=2.0), "segments: expected a positive int, got 2.0"),
    (dict(segment_frames=0), "segment_frames: expected a positive int, got 0"),
    (dict(segments=11), "segments: expected at most 10 (one frame per segment at least), got 11"),
])
def test_segment_bounds_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        segment_bounds(10, **kwargs)


# --- internalize_long -----------------------------------------------------------------------------

def test_one_segment_is_internalize(session):
    videos = [frames(5, 1), frames(3, 2, (30, 20))]
    expected = session.internalize(videos)
    got = long(session, videos)
    assert got.A.shape == expected.A.shape and got.bias_rank == expected.bias_rank == session.hypernet.config.rank
    assert not got.A.requires_grad and got.base == expected.base and got.alpha == expected.alpha
    torch.testing.assert_close(got.A, expected.A, rtol=0, atol=0)
    torch.testing.assert_close(got.B, expected.B, rtol=0, atol=0)
    one = long(session, videos[0], segments=1)  # a single video, not a list
    torch.testing.assert_close(one.A, session.internalize([videos[0]]).A)


def test_composed_delta_is_the_sum_of_the_segment_deltas_plus_the_bias(session):
    video = frames(7, 3)
    r = session.hypernet.config.rank
    got = long(session, [video], segments=3)
    assert got.A.shape == (1, 4, 4 * r, 128) and got.bias_rank == r
    clips = split_video(Video.from_frames(video), segment_bounds(7, segments=3))
    alone = session.internalize(clips)  # one adapter per segment: its rows, then the bias
    expected = delta(alone.without_bias()).sum(0, keepdim=True) + delta(alone[0]) - delta(alone[0].without_bias())
    assert_rel_close(delta(got), expected, tol=1e-5)
    torch.testing.assert_close(got.bias_block()[0], alone.bias_block()[0])  # the bias block, once, last
    # Chunk-major: the first r rows are segment 0's generated rows.
    assert_rel_close(got.A[0, :, :r], alone.A[0, :, :r], tol=1e-5)


def test_several_videos_ragged_segments_and_mean(session):
    videos = [frames(7, 4), frames(2, 5), Video.from_frames(frames(4, 6), fps=1)]
    r = session.hypernet.config.rank
    got = long(session, videos, segment_frames=2, batch_size=3, progress=False)
    assert len(got) == 3 and got.rank == 4 * r + r and got.bias_rank == r  # 4, 1 and 2 segments
    assert float(got.A[1, :, r:4 * r].abs().max()) == 0.0  # zero padding before the bias block
    torch.testing.assert_close(got.bias_block()[0], got.A[1, :, -r:])
    torch.testing.assert_close(got.A[2, :, -r:], got.A[0, :, -r:])
    for i, video in enumerate(videos):
        clip = video if isinstance(video, Video) else Video.from_frames(video)
        alone = session.internalize(split_video(clip, segment_bounds(len(clip.frames), segment_frames=2)))
        assert_rel_close(delta(got[i].without_bias())[0], delta(alone.without_bias()).sum(0), tol=1e-5)
    averaged = long(session, videos, segment_frames=2, mean=True)
    assert_rel_close(delta(averaged.without_bias()), delta(got.without_bias()) / torch.tensor(
        [4.0, 1.0, 2.0], dtype=torch.float64).view(3, 1, 1, 1), tol=1e-5)


def test_equal_segments_lay_out_as_combine_lora():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 2, 3, 10, generator=gen), torch.randn(6, 2, 3, 7, generator=gen)
    bias = (torch.randn(2, 3, 10, generator=gen), torch.randn(2, 3, 7, generator=gen))
    got = compose_segments(A, B, [3, 3], bias)
    want = combine_lora(A, B, [3, 3], bias=bias)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_max_rank_recompresses_the_generated_rows_and_keeps_the_bias(session):
    video = frames(8, 7)
    r = session.hypernet.config.rank
    full = long(session, [video], segments=4)
    k = r  # the single-shot rank: the composed adapter has the single-shot shape again
    small = long(session, [video], segments=4, max_rank=k)
    assert small.A.shape == (1, 4, k + r, 128) and small.bias_rank == r
    torch.testing.assert_close(small.bias_block()[0], full.bias_block()[0], rtol=0, atol=0)
    dense = delta(full.without_bias())
    U, S, Vh = torch.linalg.svd(dense)
    best = U[..., :k] @ torch.diag_embed(S[..., :k]) @ Vh[..., :k, :]
    assert_rel_close(delta(small.without_bias()), best, tol=1e-4)
    same = long(session, [video], segments=4, max_rank=4 * r)  # not below the rows there are: exact
    torch.testing.assert_close(same.A, full.A, rtol=0, atol=0)
    # Patched into the model, the re-compressed adapter runs like any other.
    with LoRAPatch(down_proj_targets(session.vlm.model), small.A, small.B, small.alpha):
        pass


@pytest.mark.parametrize("kwargs,message", [
    (dict(segments=5), r"^segments: expected at most 4, the frames of videos\[1\] \(one frame per segment at least\), "
                       r"got 5$"),
    (dict(segments=2, segment_frames=2), "^segments: expected either segments or segment_frames, not both"),
    (dict(segments=0), "^segments: expected a positive int, got 0$"),
    (dict(segment_frames=-1), "^segment_frames: expected a positive int, got -1$"),
    (dict(segments=2, max_rank=0), "^max_rank: expected a positive int, got 0$"),
    (dict(segments=2, max_frames=0), "^max_frames: expected a positive int, got 0$"),
])
def test_bad_input(session, kwargs, message):
    with pytest.raises(ValueError, match=message):
        long(session, [frames(6, 8), frames(4, 9)], **kwargs)


def test_bad_videos(session):
    with pytest.raises(ValueError, match=r"^videos: expected a non-empty list"):
        long(session, [], segments=2)
    with pytest.raises(ValueError, match=r"^videos\[0\]: expected a file path"):
        long(session, [42], segments=2)
    with LoRAPatch(down_proj_targets(session.vlm.model), *_zero_adapters(session)), \
            pytest.raises(ValueError, match="^vlm: expected a model without a LoRA patch"):
        long(session, [frames(4, 1)], segments=2)


def _zero_adapters(session):
    config = session.hypernet.config
    L, R = config.num_layers, config.adapter_rank
    return (torch.zeros(1, L, R, config.intermediate_size), torch.zeros(1, L, R, config.hidden_size), 1.0)


# --- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, session):
    root = tmp_path_factory.mktemp("long")
    vlm_dir = root / "vlm"
    session.vlm.model.save_pretrained(vlm_dir)
    tiny_smolvlm_tokenizer(session.vlm.model.config.text_config.vocab_size).save_pretrained(vlm_dir)
    video = root / "long.mp4"
    write_test_video(video, num_frames=16, fps=2, seed=4)
    return {"vlm": str(vlm_dir), "hypernet": save_frames2lora(session.hypernet, root / "hypernet"),
            "video": str(video), "root": root}




def test_cli_internalize_segments_and_max_rank(on_disk, capsys):
    out_file = on_disk["root"] / "long.safetensors"
    code, out, err = run(capsys, "internalize", on_disk["video"], "--vlm", on_disk["vlm"], "--hypernet",
                         on_disk["hypernet"], "--out", out_file, "--dtype", "fp32", "--device", "cpu",
                         "--segments", "2", "--max-rank", "4")
    assert code == 0, err
    assert "(2 segments each, composed, re-compressed to rank 4; bias rank 4)" in out
    session = v2l_fast.load(on_disk["vlm"], on_disk["hypernet"], dtype=torch.float32, device="cpu")
    got = Adapters.load(out_file, model=session.vlm.model)
    expected = internalize_long([on_disk["video"]], vlm=session.vlm, hypernet=session.hypernet, segments=2,
                                max_rank=4)
    assert got.bias_rank == 4 and got.A.shape == expected.A.shape == (1, 4, 8, 128)
    assert_rel_close(delta(got), delta(expected), tol=1e-6)


@pytest.mark.parametrize("extra,fragment", [
    (["--segments", "2", "--segment-frames", "3"], "--segments: expected either --segments or --segment-frames"),
    (["--segments", "0"], "--segments"),
    (["--segments", "999"], "segments: expected at most"),
])
def test_cli_bad_segments(on_disk, capsys, extra, fragment):
    code, _, err = run(capsys, "internalize", on_disk["video"], "--vlm", on_disk["vlm"], "--hypernet",
                       on_disk["hypernet"], "--out", on_disk["root"] / "bad.safetensors", "--dtype", "fp32",
                       "--device", "cpu", *extra)
    assert code == 2 and "Traceback" not in err
    assert fragment in err.strip().splitlines()[-1]
