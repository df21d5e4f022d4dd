"""Frozen-VLM features on disk, one safetensors file per video, for training runs that ask for it.

The VLM is frozen, so a video's stacked layer states (`v2l_fast.vlm.features.extract_features`)
are the same at every epoch: computing them once and reading them back afterwards removes the
VLM forward (and the video decode) from every later step.

Layout: ``CACHE/<settings>/<video>.safetensors`` where ``<settings>`` hashes everything that
changes the features — a fingerprint of every VLM parameter (names, shapes, dtypes and a strided
sample of values), the `VideoPreprocessor` settings, the internalisation instruction and the
format version — and ``<video>`` hashes the video file's bytes. A changed model, frame count,
resolution or instruction therefore lands in another folder and never reuses stale features;
a video rewritten in place gets a new name. Each file holds ``features [L, S, H]`` (the VLM's
dtype) and ``mask [S]`` of one video, trimmed after its last real token, and is written to a
temporary name then renamed, so concurrent writers (DDP ranks) and kills never leave a torn file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file

from v2l_fast.errors import fail

FORMAT_VERSION = 1
_SAMPLED_VALUES = 4096  # per parameter, in the VLM fingerprint
_READ_CHUNK = 1 << 20


def vlm_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, shape, dtype and a strided sample of its values."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _SAMPLED_VALUES)].to(device="cpu", dtype=torch.float32)
        digest.update(f"{name}:{list(param.shape)}:{param.dtype};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def settings_key(model: torch.nn.Module, preprocessor, instruction: str) -> str:
    """The cache folder name of a model + preprocessing + instruction (first 24 hex digits)."""
    settings = {"format": FORMAT_VERSION, "vlm": vlm_fingerprint(model), "instruction": instruction,
                "preprocessor": dataclasses.asdict(preprocessor)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (first 32 hex digits): the video's name in the cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:32]


class FeatureCache:
    """Features of videos for one settings key under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, key: str):
        root = os.fspath(root)
        if os.path.exists(root) and not os.path.isdir(root):
            fail("feature_cache", "a folder (created if missing)", f"the existing file {root!r}")
        self.folder = os.path.join(root, key)
        os.makedirs(self.folder, exist_ok=True)
        self._digests: dict[tuple[str, int, int], str] = {}

    def video_key(self, video_file: str) -> str:
        """The cache name of ``video_file`` (its content hash, memoised by path, size, mtime)."""
        stat = os.stat(video_file)
        memo = (os.path.abspath(video_file), stat.st_size, stat.st_mtime_ns)
        if memo not in self._digests:
            self._digests[memo] = file_digest(video_file)
        return self._digests[memo]

    def path(self, key: str) -> str:
        """The file that holds (or will hold) the features of video ``key``."""
        return os.path.join(self.folder, f"{key}.safetensors")

    def has(self, key: str) -> bool:
        """Whether the features of video ``key`` are cached."""
        return os.path.isfile(self.path(key))

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [L, S, H]`` and ``mask [S]`` of video ``key``; a corrupt file is refused by name."""
        path = self.path(key)
        try:
            tensors = load_file(path)
        except Exception as err:  # safetensors raises its own error types for a bad header
            fail("feature_cache", "a readable safetensors file of features (delete it to recompute)",
                 f"{path!r}: {err}")
        if set(tensors) != {"features", "mask"} or tensors["features"].dim() != 3 \
                or tensors["mask"].shape != tensors["features"].shape[1:2]:
            fail("feature_cache", "tensors features [L, S, H] and mask [S] (delete the file to recompute)",
                 f"{path!r} with {sorted((k, list(v.shape)) for k, v in tensors.items())}")
        return tensors["features"], tensors["mask"]

    def store(self, key: str, features: torch.Tensor, mask: torch.Tensor) -> None:
        """Write one video's ``features [L, S, H]`` and ``mask [S]`` atomically."""
        path = self.path(key)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file({"features": features.detach().contiguous().cpu(), "mask": mask.contiguous().cpu()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def trim(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One video's ``features [L, S, H]`` and ``mask [S]`` cut after the last real token."""
    length = int(mask.nonzero().max()) + 1
    return features[:, :length], mask[:length]


def pad_videos(videos: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-video ``(features [L, S_i, H], mask [S_i])`` into ``[B, L, S, H]`` and ``[B, S]``,
    right-padded with zeros (masked out) to the longest."""
    L, _, H = videos[0][0].shape
    width = max(f.shape[1] for f, _ in videos)
    features = videos[0][0].new_zeros(len(videos), L, width, H)
    mask = videos[0][1].new_zeros(len(videos), width)
    for b, (f, m) in enumerate(videos):
        features[b, :, :f.shape[1]] = f
        mask[b, :m.shape[0]] = m
    return features, mask
