"""Training checkpoints: atomic directories that resume a run exactly.

Layout of a run's ``OUT`` folder::

    OUT/checkpoints/step-00000200/   the last ``keep_last`` saves (older ones are deleted)
        hypernet/                    save_frames2lora: model.safetensors + config.json
        trainer.pt                   optimizer, scheduler, RNG states (python, numpy, torch, cuda)
        state.json                   step, data position, best validation CE so far, global batch
        train_config.json            the run's resolved TrainConfig
    OUT/best/                        the same contents, of the best validation CE so far
    OUT/metrics.jsonl                one JSON object per logged step / evaluation

A checkpoint is written into a hidden temporary folder beside its final name and renamed into
place (`os.replace`), so a kill at any moment leaves either the previous checkpoints or the new
one, never a torn directory. ``hypernet/`` loads on its own with
`v2l_fast.hypernet.load_frames2lora` (e.g. ``v2l-fast internalize --hypernet OUT/best/hypernet``).

A checkpoint made for another architecture (another base model, rank or Perceiver size) is
refused before any weight is read, in one line naming its ``config.json`` and the field.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file

from v2l_fast.compat import base_dimensions, check_fits
from v2l_fast.errors import fail
from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig, save_frames2lora
from v2l_fast.hypernet.checkpoint import CONFIG_FILE, WEIGHTS_FILE

CHECKPOINTS = "checkpoints"
BEST = "best"
HYPERNET = "hypernet"
TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"
CONFIG_NAME = "train_config.json"
_STEP_DIR = re.compile(r"step-(\d+)$")
# Perceiver / head sizes compared besides the base-model dimensions and the rank.
_ARCHITECTURE = ("latent_size", "num_latent_queries", "num_blocks", "num_self_attn_per_block", "num_heads",
                 "head_dim", "num_kv_heads", "num_pre_head_layers")


@dataclass
class Loaded:
    """What `load_checkpoint` read: the directory, its state.json and trainer.pt contents."""

    directory: str
    state: dict
    trainer: dict


def rng_state() -> dict:
    """The RNG states of python, numpy, torch and (when present) every CUDA device."""
    numpy_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": numpy_state["bit_generator"], "has_gauss": numpy_state["has_gauss"],
                       "gauss": numpy_state["gauss"], "pos": numpy_state["state"]["pos"],
                       "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (CUDA states only where both runs have CUDA)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state({"bit_generator": saved["bit_generator"], "has_gauss": saved["has_gauss"],
                         "gauss": saved["gauss"],
                         "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]}})
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _publish(tmp: str, final: str) -> None:
    """Rename the finished folder ``tmp`` to ``final``, replacing an existing one."""
    parent, name = os.path.split(final)
    if os.path.exists(final):
        old = os.path.join(parent, f".old-{name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def write_checkpoint(directory: str, *, hypernet: Frames2LoRA, optimizer, scheduler, state: dict,
                     config_dict: dict) -> str:
    """Write one checkpoint to ``directory`` atomically (see the module docstring); return it."""
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        save_frames2lora(hypernet, os.path.join(tmp, HYPERNET))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   os.path.join(tmp, TRAINER_FILE))
        for file_name, content in ((STATE_FILE, state), (CONFIG_NAME, config_dict)):
            with open(os.path.join(tmp, file_name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
        _publish(tmp, directory)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return directory


def step_dirs(out_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the run's complete step checkpoints, oldest first."""
    folder = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := _STEP_DIR.match(name))]
    return sorted(found)


def save_step(out_dir: str, step: int, keep_last: int, **contents) -> str:
    """Write ``OUT/checkpoints/step-NNNNNNNN`` (`write_checkpoint`), then keep only the last ``keep_last``."""
    path = write_checkpoint(os.path.join(out_dir, CHECKPOINTS, f"step-{step:08d}"), **contents)
    for _, old in step_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return path


def save_best(out_dir: str, **contents) -> str:
    """Write ``OUT/best`` (`write_checkpoint`), replacing the previous best."""
    return write_checkpoint(os.path.join(out_dir, BEST), **contents)


def remove_partial_writes(out_dir: str) -> None:
    """Delete temporary folders a killed run left behind (its complete checkpoints are kept)."""
    for parent in (out_dir, os.path.join(out_dir, CHECKPOINTS)):
        if os.path.isdir(parent):
            for name in os.listdir(parent):
                if name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(os.path.join(parent, name))


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete step checkpoint of the run in ``out_dir`` (None: none yet)."""
    found = step_dirs(out_dir)
    return found[-1][1] if found else None


def check_architecture(directory: str, expected: Frames2LoRAConfig) -> None:
    """Refuse a checkpoint whose hypernetwork is not ``expected``'s architecture, naming the file and field."""
    path = os.path.join(directory, HYPERNET, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = Frames2LoRAConfig.from_dict(json.load(f).get("config"))
    except OSError as err:
        fail(path, "the hypernetwork config of a checkpoint written by v2l-fast train", f"{type(err).__name__}: {err}")
    except (ValueError, AttributeError) as err:
        fail(path, "a valid Frames2LoRA config.json", " ".join(str(err).split()))
    check_fits(path, "a checkpoint", {**base_dimensions(saved), "rank": saved.rank},
               {**base_dimensions(expected), "rank": expected.rank})
    for field in _ARCHITECTURE:
        if getattr(saved, field) != getattr(expected, field):
            fail(f"{path}: config.{field}", f"{getattr(expected, field)} (the architecture of this run)",
                 getattr(saved, field))


def load_checkpoint(directory: str, hypernet: Frames2LoRA) -> Loaded:
    """Read a checkpoint into ``hypernet`` (after `check_architecture`) and return its trainer state."""
    check_architecture(directory, hypernet.config)
    weights = os.path.join(directory, HYPERNET, WEIGHTS_FILE)
    device = next(hypernet.parameters()).device
    try:
        hypernet.load_state_dict(load_file(weights, device=str(device)), strict=True)
    except (OSError, RuntimeError) as err:
        fail(weights, "the weights of this hypernetwork", " ".join(str(err).split())[:300])
    trainer_path, state_path = os.path.join(directory, TRAINER_FILE), os.path.join(directory, STATE_FILE)
    try:
        trainer = torch.load(trainer_path, map_location="cpu", weights_only=True)
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        fail(directory, f"a complete checkpoint ({TRAINER_FILE}, {STATE_FILE})", " ".join(str(err).split())[:300])
    return Loaded(directory, state, trainer)
