"""Long videos: internalize consecutive segments in one batched pass, compose their adapters.

A video longer than the hypernetwork's context (DESIGN.md: linear cost instead of one VLM
forward over every frame) is split into consecutive segments of frames; every segment of every
video goes through the VLM and the hypernetwork together, in batches, and each video's segment
adapters are composed in rank space (docs/method.md §5)::

    ΔW_video = α · ( Σ_segments w_s B_sᵀ A_s  +  bias_Bᵀ bias_A )

with w_s = 1 (the spec's sum; ``mean=True`` gives 1/n, the average of the segment deltas). The
result is laid out as the spec's ``combine_lora`` lays it out — the generated rows of each
segment, chunk-major, then the shared bias block once — except that a video with fewer segments
than the longest is zero-padded *before* its bias block, so that the bias block is always the
trailing ``r`` rows and `Adapters.bias_rank` stays meaningful (`Adapters.without_bias`, the bias
fold of `v2l_fast.adapters.fold`).

Re-compression (``max_rank=k``) applies to the per-video rows only: their sum is replaced by its
best rank-k approximation (`v2l_fast.ops.compose_adapters`), and the bias block is appended
unchanged afterwards. The adapter then has ``k + r`` rows with ``bias_rank = r``, and one
single-shot adapter's shape (``2r``) is reached with ``max_rank = r``. Keeping the bias out of
the truncation is what keeps it foldable and shared: a truncation of the sum with the bias would
mix the bias into per-video rows and spend rank on a term every video shares.

Each segment is a clip of its own: its frames keep their spacing, but its timestamps start at
0 and its duration is its share of the video's, which is the kind of clip the hypernetwork was
trained on (composition is a sum, so a segment's place in the video is not kept anyway).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from v2l_fast import ops
from v2l_fast.adapters import Adapters, base_fingerprint
from v2l_fast.api import as_list, backend_scope, batch_ranges, check_base_model, check_hypernet, generate_adapters
from v2l_fast.errors import fail
from v2l_fast.hypernet.compose import combine_lora
from v2l_fast.vlm.frames import DEFAULT_INSTRUCTION
from v2l_fast.vlm.load import VLM
from v2l_fast.vlm.video import Video, read_video

# Frames read from a file when the segments are given by length (``segment_frames``) and
# ``max_frames`` is not: 1024, the long-video scale of DESIGN.md's cost table.
DEFAULT_LONG_MAX_FRAMES = 1024


def _positive(name: str, value: object) -> int:
    if type(value) is not int or value < 1:
        fail(name, "a positive int", repr(value))
    return value


def check_split(segments: int | None, segment_frames: int | None) -> None:
    """Refuse (ValueError naming the argument) both ``segments`` and ``segment_frames``, or a non-positive one."""
    if segments is not None and segment_frames is not None:
        fail("segments", "either segments or segment_frames, not both",
             f"segments={segments!r} and segment_frames={segment_frames!r}")
    if segments is not None:
        _positive("segments", segments)
    if segment_frames is not None:
        _positive("segment_frames", segment_frames)


def segment_bounds(num_frames: int, *, segments: int | None = None,
                   segment_frames: int | None = None) -> list[tuple[int, int]]:
    """``[(start, end), …]`` of consecutive segments covering ``num_frames`` frames.

    ``segments=n``: n segments whose lengths differ by at most one (the earlier ones longer);
    ``segment_frames=f``: segments of f frames, the last one shorter when f does not divide the
    count. Neither: one segment. Fails (ValueError naming the argument) for both, a non-positive
    value, or more segments than frames.
    """
    check_split(segments, segment_frames)
    if segment_frames is not None:
        size = segment_frames
        return [(start, min(start + size, num_frames)) for start in range(0, num_frames, size)]
    n = 1 if segments is None else segments
    if n > num_frames:
        fail("segments", f"at most {num_frames} (one frame per segment at least)", n)
    cuts = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(num_frames), n)]).tolist()
    return list(zip(cuts[:-1], cuts[1:]))


def split_video(video: Video, bounds: Sequence[tuple[int, int]]) -> list[Video]:
    """The clips of ``video`` between ``bounds``, each with timestamps from 0 (module docstring)."""
    parts, total = [], len(video.frames)
    for start, end in bounds:
        times = video.timestamps[start:end]
        parts.append(Video(video.frames[start:end], tuple(t - times[0] for t in times),
                           video.duration * (end - start) / total, f"{video.source}[frames {start}:{end}]"))
    return parts


def _read(item, index: int, vlm: VLM, max_frames: int) -> Video:
    if isinstance(item, Video):
        return item
    if isinstance(item, (str, os.PathLike)):
        return read_video(item, max_frames=max_frames, target_fps=vlm.preprocessor.fps)
    if isinstance(item, (np.ndarray, list, tuple)):
        return Video.from_frames(item, source=f"videos[{index}]")
    fail(f"videos[{index}]", "a file path, a Video, a list of PIL images or a uint8 array [F, H, W, 3]",
         type(item).__name__)


def internalize_long(videos, *, vlm: VLM, hypernet, segments: int | None = None, segment_frames: int | None = None,
                     max_rank: int | None = None, mean: bool = False, max_frames: int | None = None,
                     instruction: str = DEFAULT_INSTRUCTION, batch_size: int | None = None,
                     progress: bool | None = None, backend: str = "auto") -> Adapters:
    """Internalize long videos in segments: one adapter per video, composed in rank space.

    Args:
        videos: one video (a file path, a `Video` or a uint8 array ``[F, H, W, 3]``) or a list
            of them (PIL-image lists too), as `v2l_fast.api.internalize` takes them.
        vlm: the `VLM`; its ``down_proj`` must not be patched.
        hypernet: a `Frames2LoRA` for this VLM.
        segments: split every video into this many consecutive segments (at most its frames).
        segment_frames: or: segments of this many frames each (the last may be shorter).
            Neither: one segment per video, which is `internalize`.
        max_rank: re-compress each video's generated rows (not the bias block) to their best
            rank-≤max_rank approximation; the adapter then has ``max_rank + r`` rows. None, or at
            least the rows there are: no re-compression (exact sum).
        mean: weight each segment's delta by 1/n (n = the video's segments) instead of 1.
        max_frames: frames read from a video *file* (default: ``segments ×`` the
            preprocessor's ``max_frames``, or `DEFAULT_LONG_MAX_FRAMES` with ``segment_frames``);
            frames given as arrays or `Video` are used as they are.
        instruction: the internalisation text after each segment (spec §2 default).
        batch_size: segments per VLM + hypernetwork forward (None: all at once).
        progress: tqdm bar (None: shown when there is more than one batch).
        backend: kernel backend of every op (as `internalize`'s).

    Returns:
        `Adapters` with one adapter per video, ``bias_rank`` = the hypernetwork's rank r.
    """
    if isinstance(videos, np.ndarray) and videos.ndim == 4:  # one video's frames [F, H, W, 3]
        videos = [videos]
    videos = as_list(videos, "videos", (str, os.PathLike, Video))
    check_hypernet(hypernet, vlm.model)
    check_base_model(vlm)
    check_split(segments, segment_frames)
    if max_rank is not None:
        _positive("max_rank", max_rank)
    if max_frames is None:
        max_frames = (DEFAULT_LONG_MAX_FRAMES if segment_frames is not None
                      else vlm.preprocessor.max_frames * (segments or 1))
    _positive("max_frames", max_frames)
    clips, sizes = [], []
    for index, item in enumerate(videos):
        video = _read(item, index, vlm, max_frames)
        if segments is not None and segments > len(video.frames):
            fail("segments", f"at most {len(video.frames)}, the frames of videos[{index}] (one frame per segment "
                 "at least)", segments)
        bounds = segment_bounds(len(video.frames), segments=segments, segment_frames=segment_frames)
        clips += split_video(video, bounds)
        sizes.append(len(bounds))
    hn_device = next(hypernet.parameters()).device
    gen_A, gen_B, out = [], [], None
    with backend_scope(backend, hn_device):
        for start, end in batch_ranges(len(clips), batch_size, progress, "internalize segments"):
            out = generate_adapters(clips[start:end], vlm=vlm, hypernet=hypernet, instruction=instruction)
            gen_A.append(out.generated_A)
            gen_B.append(out.generated_B)
        with torch.no_grad():  # the bias block is the hypernetwork's parameter itself
            A, B = compose_segments(torch.cat(gen_A), torch.cat(gen_B), sizes, (out.bias_A, out.bias_B),
                                    max_rank=max_rank, mean=mean)
    return Adapters(A, B, out.alpha, base_fingerprint(vlm.model), bias_rank=out.bias_A.shape[-2])


def compose_segments(A: torch.Tensor, B: torch.Tensor, sizes: Sequence[int], bias: tuple[torch.Tensor, torch.Tensor],
                     *, max_rank: int | None = None, mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter per video from its segments' generated factors (module docstring).

    Args:
        A: ``[N, L, r, I]`` generated rows of N segments, video-major, in order.
        B: ``[N, L, r, H]``.
        sizes: segments of each video (Σ = N).
        bias: ``(bias_A [L, r_b, I], bias_B [L, r_b, H])``, appended once per video, last.
        max_rank: re-compress the generated rows of each video to this rank (see `internalize_long`).
        mean: weight each segment by 1/n of its video.

    Returns:
        ``(A [G, L, R, I], B [G, L, R, H])``: each video's generated rows (zero-padded to the
        longest video's), then the bias block; ``R = n_max·r + r_b`` (or ``min(max_rank, …) + r_b``).
        With equal sizes and no re-compression, exactly ``combine_lora(A, B, sizes, bias=bias)``.
    """
    sizes = list(sizes)
    scalers = None
    if mean:
        scalers = [1.0 / n for n in sizes for _ in range(n)]
    rows = max(sizes) * A.shape[2]
    # combine_lora without a bias leaves zeros after each video's rows: keep the generated part.
    gen_A, gen_B = combine_lora(A, B, sizes, scalers=scalers)
    gen_A, gen_B = gen_A[:, :, :rows], gen_B[:, :, :rows]
    if max_rank is not None and max_rank < rows:
        gen_A, gen_B = ops.compose_adapters([gen_A], [gen_B], max_rank=max_rank)
    G = len(sizes)
    bias_A = bias[0].expand(G, *bias[0].shape)
    bias_B = bias[1].expand(G, *bias[1].shape)
    return ops.compose_adapters([gen_A], [gen_B], bias=(bias_A, bias_B))
