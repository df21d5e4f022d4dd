"""The training run's settings: spec §7's values as defaults, a config file, then flags.

`TrainConfig` holds every setting of ``v2l-fast train``. `load_config` reads a JSON file (or TOML
for a ``.toml`` name), refusing an unknown key or a value of the wrong type with one line naming
the file and the field; `TrainConfig.replace` applies command-line overrides on top. The
resolved config is written into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass

import tomllib

from v2l_fast.errors import fail
from v2l_fast.vlm.frames import DEFAULT_INSTRUCTION


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a Frames2LoRA training run (spec §7 defaults; the CLI's ``--help`` lists them)."""

    # data and models
    vlm: str | None = None
    train_manifest: str | None = None
    val_manifest: str | None = None
    data_root: str | None = None
    init_hypernet: str | None = None
    out_dir: str = "runs/frames2lora"
    feature_cache: str | None = None
    # hypernetwork architecture of a fresh run (spec §6 presets)
    rank: int = 16
    latent_size: int = 512
    num_latent_queries: int = 8
    num_blocks: int = 9
    num_self_attn_per_block: int = 0
    # objective
    kl_weight: float = 0.0
    kl_temperature: float = 1.0
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_steps: int = 1000
    videos_per_device: int = 2
    questions_per_video: int = 4
    grad_accum: int = 8
    seed: int = 42
    bf16: bool = True
    # video inputs
    max_frames: int = 12
    instruction: str = DEFAULT_INSTRUCTION
    # evaluation, checkpoints, logging
    eval_every: int = 100
    eval_videos: int | None = None
    save_every: int = 100
    keep_last: int = 3
    num_workers: int = 2
    log_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "config") -> None:
        """Refuse values out of range, naming ``source`` (a file, or "config") and the field."""
        for name in ("rank", "latent_size", "num_latent_queries", "num_blocks", "max_steps", "videos_per_device",
                     "questions_per_video", "grad_accum", "max_frames", "eval_every", "save_every",
                     "keep_last", "log_every"):
            if getattr(self, name) < 1:
                fail(f"{source}: {name}", "an int >= 1", getattr(self, name))
        for name in ("num_self_attn_per_block", "num_workers", "weight_decay", "kl_weight", "max_grad_norm"):
            if getattr(self, name) < 0:
                fail(f"{source}: {name}", "a value >= 0", getattr(self, name))
        for name in ("lr", "eps", "kl_temperature"):
            if getattr(self, name) <= 0:
                fail(f"{source}: {name}", "a value > 0", getattr(self, name))
        if not 0 <= self.warmup_ratio <= 1:
            fail(f"{source}: warmup_ratio", "a fraction in [0, 1]", self.warmup_ratio)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            fail(f"{source}: betas", "two numbers in [0, 1)", list(self.betas))
        if self.eval_videos is not None and self.eval_videos < 1:
            fail(f"{source}: eval_videos", "an int >= 1 or null (every validation video)", self.eval_videos)

    @property
    def warmup_steps(self) -> int:
        """int(max_steps × warmup_ratio), as the authors' schedule."""
        return int(self.max_steps * self.warmup_ratio)

    def replace(self, **overrides) -> TrainConfig:
        """A copy with ``overrides`` (None values are ignored: an unset flag keeps the file's value)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        """Plain-JSON form (betas as a list)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_HINTS = typing.get_type_hints(TrainConfig)
_KINDS = {bool: "true or false", int: "an int", float: "a number", str: "a string"}
FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _coerce(source: str, name: str, value):
    """``value`` as field ``name``'s type, or a one-line error naming ``source`` and the field."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        fail(f"{source}: {name}", "two numbers" if typing.get_origin(base) is tuple else _KINDS[base], "null")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(base) is tuple and isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)
    kind = "two numbers" if typing.get_origin(base) is tuple else _KINDS[base]
    fail(f"{source}: {name}", kind + (" or null" if optional else ""), json.dumps(value))


def config_from_dict(data: dict, source: str = "config") -> TrainConfig:
    """A `TrainConfig` from a dict of fields; unknown keys and wrong types name ``source`` and the field."""
    if not isinstance(data, dict):
        fail(source, "a JSON/TOML object of training settings", type(data).__name__)
    for key in data:
        if key not in FIELDS:
            fail(f"{source}: {key}", f"one of the training settings {list(FIELDS)}", "an unknown key")
    values = {key: _coerce(source, key, value) for key, value in data.items()}
    try:
        return TrainConfig(**values)
    except ValueError as err:  # validate() names "config"; name the file instead
        raise ValueError(str(err).replace("config: ", f"{source}: ", 1)) from None


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a config file: JSON, or TOML when the name ends in ``.toml``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        fail("--config", "an existing JSON or TOML file", f"{path!r}, which was not found")
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        fail(path, "a valid JSON (or .toml) file of training settings", f"{type(err).__name__}: {err}")
    return config_from_dict(data, path)
