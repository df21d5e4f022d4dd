"""Loading and saving Frames2LoRA hypernetworks (docs/method.md §6).

Three sources load through `load_frames2lora`:

* the official ``.pt`` file (``torch.save`` of a flat state dict plus pickled config objects),
  read by a restricted unpickler: tensors are rebuilt, every ``ctx_to_lora.*`` / ``peft.*``
  class becomes an inert `PickledRecord`, and any other global is refused before it runs;
* a plain dict of the same tensors, or a ``.safetensors`` file of them;
* v2l_fast's own format, written by `save_frames2lora`: a directory with ``model.safetensors``
  and ``config.json``.

For the first two the architecture is inferred from the tensor shapes alone.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

from v2l_fast.compat import base_dimensions, check_fits
from v2l_fast.errors import fail
from v2l_fast.hypernet.config import DEFAULT_HEAD_DIM, Frames2LoRAConfig
from v2l_fast.hypernet.model import TARGET_MODULE, Frames2LoRA

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "v2l_fast.frames2lora"
FORMAT_VERSION = 1

_PERCEIVER = "aggregator.perceiver."
_COMPILE_PREFIX = "_orig_mod."


class PickledRecord:
    """Inert stand-in for a pickled ``ctx_to_lora`` / ``peft`` object.

    It accepts any constructor arguments and state and keeps them as plain attributes
    (``record.lora_config.r``); no code of the original class runs. ``pickled_class`` is the
    class's dotted name.
    """

    pickled_class = ""

    def __new__(cls, *args, **kwargs):
        record = object.__new__(cls)
        record.pickled_args = args
        return record

    def __init__(self, *args, **kwargs) -> None:
        self.pickled_args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state) -> None:
        # (dict, slot-dict) is what pickle passes for objects with __slots__.
        for part in state if isinstance(state, tuple) else (state,):
            if isinstance(part, dict):
                self.__dict__.update(part)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if k != "pickled_args")
        return f"<{self.pickled_class}({fields})>"


_RECORD_PACKAGES = ("ctx_to_lora", "peft")
# Everything else a torch.save'd state dict with those configs needs; storages are resolved by
# torch.load itself before find_class is consulted.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}
_record_classes: dict[str, type] = {}


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle references a global that is neither a tensor part nor a config."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module.split(".")[0] in _RECORD_PACKAGES:
            dotted = f"{module}.{name}"
            if dotted not in _record_classes:
                _record_classes[dotted] = type(name, (PickledRecord,), {"pickled_class": dotted})
            return _record_classes[dotted]
        raise UnsafeCheckpointError(
            f"path: refusing to unpickle the global '{module}.{name}': a Frames2LoRA checkpoint "
            "holds only tensors and ctx_to_lora/peft config objects, so this file is not one "
            "(or has been tampered with); nothing from it was executed")


# torch.load takes a module-like object whose Unpickler it subclasses for the zip format.
_restricted_pickle = types.ModuleType("v2l_fast_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = pickle.load
_restricted_pickle.__name__ = "v2l_fast_restricted_pickle"


def read_official_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Read an official Frames2LoRA ``.pt`` file safely: a dict of tensors and metadata.

    Non-tensor entries (``base_model_name_or_path``, ``hypernet_config``,
    ``ctx_encoder_args``) come back as strings / `PickledRecord`s. Raises
    `UnsafeCheckpointError` (a ValueError) if the pickle references any other global.
    """
    if not zipfile.is_zipfile(path):
        fail("path", "a checkpoint in torch.save's zip format (the official save)",
             f"{os.fspath(path)!r}, which is not a zip archive")
    # A pickle_module makes torch.load use our find_class for every non-storage global.
    try:
        entries = torch.load(path, map_location=map_location, pickle_module=_restricted_pickle)
        problem = None
    except UnsafeCheckpointError:
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        problem = f"{os.fspath(path)!r}: {type(err).__name__}: {err}"
    if problem is not None:
        fail("path", "a readable torch.save checkpoint", problem)
    if not isinstance(entries, Mapping):
        fail("path", "a checkpoint holding a state dict", type(entries).__name__)
    return dict(entries)


def _strip_compile_prefix(state_dict: Mapping) -> dict:
    return {key.replace(_COMPILE_PREFIX, ""): value for key, value in state_dict.items()}


def _require(state_dict: Mapping, key: str) -> torch.Tensor:
    value = state_dict.get(key)
    if not isinstance(value, torch.Tensor):
        some = sorted(state_dict)[:4]
        fail("checkpoint", f"the tensor {key!r} of a Frames2LoRA state dict",
             f"{'no such key' if value is None else type(value).__name__} (keys start {some})")
    return value


def _layer_indices(state_dict: Mapping, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in state_dict if (m := pattern.match(key))})


def infer_config(state_dict: Mapping, *,
                 base_model_name_or_path: str | None = None) -> Frames2LoRAConfig:
    """The architecture of a Frames2LoRA state dict, read from its tensor shapes (spec §6).

    D and Q come from the encoder queries, NB and NS from the encoder layers, L, r, I and H
    from the bias block; nh and nkv from the attention projections with the official head
    dim (128, fixed in the official code). Only one target module (M = 1, ``down_proj``) is
    supported, as in every released checkpoint.
    """
    Q, D = _require(state_dict, _PERCEIVER + "encoder.latents_q").shape
    L, r, I = _require(state_dict, f"bias_A.{TARGET_MODULE}").shape
    H = _require(state_dict, f"bias_B.{TARGET_MODULE}").shape[-1]
    decoder_queries = _require(state_dict, _PERCEIVER + "decoder.latents_q").shape[0]
    if decoder_queries != r:
        fail("checkpoint", f"decoder.latents_q with r = {r} rows (one target module, M = 1)",
             f"{decoder_queries} rows: multi-module checkpoints (M > 1) are not supported")
    layers = _layer_indices(state_dict, _PERCEIVER + "encoder.layers.")
    cross = [f"{_PERCEIVER}encoder.layers.{j}.input_context_layernorm.weight" in state_dict
             for j in layers]
    num_blocks = sum(cross)
    per_block = len(layers) // max(num_blocks, 1)
    expected = ([True] + [False] * (per_block - 1)) * num_blocks
    if layers != list(range(len(layers))) or not num_blocks or cross != expected:
        fail("checkpoint", "encoder layers 0..n-1 in blocks of one cross-attention layer and "
             "NS self-attention layers", f"layers {layers} with cross-attention at "
             f"{[j for j, c in zip(layers, cross) if c]}")
    q_rows = _require(state_dict, _PERCEIVER + "encoder.layers.0.self_attn.q_proj.weight").shape[0]
    kv_rows = _require(state_dict, _PERCEIVER + "encoder.layers.0.self_attn.k_proj.weight").shape[0]
    hd = DEFAULT_HEAD_DIM
    if q_rows % hd or kv_rows % hd:
        fail("checkpoint", f"q_proj/k_proj rows that are multiples of the head dim {hd}",
             f"{q_rows} and {kv_rows}")
    return Frames2LoRAConfig(
        num_layers=L, hidden_size=H, intermediate_size=I, rank=r, latent_size=D,
        num_latent_queries=Q, num_blocks=num_blocks, num_self_attn_per_block=per_block - 1,
        num_heads=q_rows // hd, head_dim=hd, num_kv_heads=kv_rows // hd,
        num_pre_head_layers=len(_layer_indices(state_dict, "layers.")),
        base_model_name_or_path=base_model_name_or_path)


def _build(config: Frames2LoRAConfig, state_dict: Mapping, device) -> Frames2LoRA:
    # Built on the meta device: the checkpoint's tensors become the parameters (no random
    # init of a model about to be overwritten).
    with torch.device("meta"):
        model = Frames2LoRA(config)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
        problems = None
    except RuntimeError as err:
        # torch lists one problem per "\n\t"-indented line after a header.
        problems = "; ".join(str(err).split("\n\t")[1:]) or str(err)
    if problems is not None:
        fail("checkpoint", "tensors whose names and shapes fit one Frames2LoRA architecture",
             problems)
    return model.to(device) if device is not None else model


def _check_pickled_config(config: Frames2LoRAConfig, record) -> None:
    """Cross-check the official pickled HypernetConfig against the shapes (a corrupt file)."""
    aggregator = getattr(record, "aggregator_config", None)
    pairs = [("latent_size", getattr(record, "latent_size", None), config.latent_size),
             ("num_pre_head_layers", getattr(record, "num_pre_head_layers", None),
              config.num_pre_head_layers)]
    if aggregator is not None:
        pairs += [(f"aggregator_config.{name}", getattr(aggregator, name, None), value)
                  for name, value in (("num_layers", config.num_layers), ("lora_r", config.rank),
                                      ("n_latent_queries", config.num_latent_queries),
                                      ("num_blocks", config.num_blocks),
                                      ("num_self_attn_per_block", config.num_self_attn_per_block),
                                      ("feature_size", config.hidden_size))]
    for name, pickled, shaped in pairs:
        if pickled is not None and pickled != shaped:
            fail("checkpoint", f"hypernet_config.{name} = {shaped} as the tensor shapes say",
                 pickled)


def _load_own_format(directory: str, device: str) -> tuple[Frames2LoRAConfig, dict]:
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for required in (config_path, weights_path):
        if not os.path.isfile(required):
            fail("path", f"a directory written by save_frames2lora (with {CONFIG_FILE} and "
                 f"{WEIGHTS_FILE})", f"{directory!r} without {os.path.basename(required)}")
    try:
        with open(config_path) as f:
            meta = json.load(f)
    except ValueError as err:
        fail("path", f"a valid JSON {CONFIG_FILE}", f"{config_path}: {err}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        fail("path", f"a {CONFIG_FILE} with format {FORMAT_NAME!r}", config_path)
    if meta.get("version") != FORMAT_VERSION:
        fail("path", f"format version {FORMAT_VERSION}", f"{meta.get('version')} in {config_path}")
    return Frames2LoRAConfig.from_dict(meta.get("config")), load_file(weights_path, device=device)


def load_frames2lora(path_or_state_dict, *, expect=None, device=None) -> Frames2LoRA:
    """Load a Frames2LoRA hypernetwork, in eval mode.

    Args:
        path_or_state_dict: an official ``.pt`` checkpoint, a ``.safetensors`` file of its
            tensors, a directory written by `save_frames2lora`, or a dict of tensors (official
            key names; ``_orig_mod.`` prefixes of compiled models are stripped).
        expect: optional `Frames2LoRAConfig` or transformers VLM/text config; a checkpoint
            whose L, H, I (or, for a Frames2LoRAConfig, r) differ is refused, naming them.
        device: where the weights go (default: where they are read, the CPU).

    Returns:
        `Frames2LoRA` whose ``config`` was read from the file or inferred from the shapes.
    """
    if isinstance(path_or_state_dict, Mapping):
        entries = dict(path_or_state_dict)
        config = None
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        read_to = str(device) if device is not None else "cpu"
        if os.path.isdir(path):
            config, entries = _load_own_format(path, read_to)
        elif not os.path.isfile(path):
            fail("path", "an existing checkpoint file or directory", repr(path))
        elif path.endswith(".safetensors"):
            config, entries = None, load_file(path, device=read_to)
        else:
            config, entries = None, read_official_checkpoint(path, map_location=device)
    else:
        fail("path_or_state_dict", "a path or a dict of tensors", type(path_or_state_dict).__name__)
    entries = _strip_compile_prefix(entries)
    records = {k: v for k, v in entries.items() if not isinstance(v, torch.Tensor)}
    state_dict = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)}
    if config is None:
        name = records.get("base_model_name_or_path")
        config = infer_config(state_dict, base_model_name_or_path=name if isinstance(name, str) else None)
        if "hypernet_config" in records:
            _check_pickled_config(config, records["hypernet_config"])
    if expect is not None:
        wanted = base_dimensions(expect, "expect")
        if isinstance(expect, Frames2LoRAConfig):
            wanted["rank"] = expect.rank
        check_fits("checkpoint", "a checkpoint", {**base_dimensions(config), "rank": config.rank}, wanted)
    return _build(config, state_dict, device).eval()


def save_frames2lora(model: Frames2LoRA, directory: str | os.PathLike) -> str:
    """Write ``model`` in v2l_fast's format: ``directory/model.safetensors`` + ``config.json``.

    Returns the directory; `load_frames2lora(directory)` reads it back.
    """
    if not isinstance(model, Frames2LoRA):
        fail("model", "a Frames2LoRA", type(model).__name__)
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        fail("directory", "a directory path (created if missing)", f"the existing file {directory!r}")
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                   "config": model.config.to_dict()}, f, indent=2)
    return directory
