"""Load a SmolVLM2 (256M / 500M / 2.2B) through transformers' own classes.

`load_smolvlm` returns a `VLM`: the ``SmolVLMForConditionalGeneration``, its tokenizer and
the `VideoPreprocessor` read from its ``preprocessor_config.json``. SmolVLM2's processor class
is not used: it needs torchvision and ``num2words``, and v2l_fast builds the video inputs
itself (`v2l_fast.vlm.frames`).

Compatibility path: a model saved while PEFT-wrapped (as the Frames2LoRA fixture's tiny VLM
was) stores ``…down_proj.base_layer.weight`` plus ``lora_A``/``lora_B`` instead of
``…down_proj.weight``; transformers then leaves ``down_proj`` randomly initialised. The loader
copies each ``base_layer`` weight into place, drops the LoRA tensors (the adapters are
disabled in that code path) and refuses any other missing weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from v2l_fast.errors import fail
from v2l_fast.vlm.frames import IMAGE_TOKEN, VideoPreprocessor

_PEFT_BASE = ".base_layer."


@dataclass
class VLM:
    """A SmolVLM2 ready for v2l_fast: model (eval mode), tokenizer, video preprocessing."""

    model: torch.nn.Module
    tokenizer: object
    preprocessor: VideoPreprocessor

    def __post_init__(self):
        check_image_token(self.model.config, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def check_image_token(config, tokenizer) -> None:
    """Refuse a tokenizer whose ``<image>`` id is not the model's ``image_token_id``."""
    token = getattr(tokenizer, "image_token", IMAGE_TOKEN)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id != config.image_token_id:
        fail("tokenizer", f"{token!r} to have id {config.image_token_id} (the model's image_token_id)",
             f"{token_id}; tokenizer and model do not belong together")


def load_smolvlm(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str = torch.bfloat16,
                 device: str | torch.device = "cpu", tokenizer=None,
                 preprocessor: VideoPreprocessor | None = None, **preprocessor_overrides) -> VLM:
    """Load a SmolVLM2 from a hub id (e.g. ``HuggingFaceTB/SmolVLM2-500M-Video-Instruct``) or a dir.

    Args:
        name_or_path: hub id or local directory of a ``SmolVLMForConditionalGeneration``.
        dtype: weight dtype (the official pipeline runs the VLM in bf16).
        device: where to put the model.
        tokenizer: a tokenizer to use instead of the one stored with the model (needed when
            the directory has none).
        preprocessor: video settings to use instead of those read from the model's
            ``preprocessor_config.json`` (or derived from its config when it has none).
        preprocessor_overrides: fields of `VideoPreprocessor` to override (``max_frames=…``).
    """
    from transformers import AutoTokenizer, SmolVLMForConditionalGeneration

    source = os.fspath(name_or_path)
    _check_source(source)
    _check_architecture(source)
    model, info = SmolVLMForConditionalGeneration.from_pretrained(source, dtype=dtype, output_loading_info=True)
    _restore_peft_base_weights(model, info, source)
    model = model.to(device).eval()
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            fail("name_or_path", "a model with a tokenizer, or pass tokenizer=",
                 f"{source!r}, from which no tokenizer could be loaded ({err})")
    if preprocessor is None:
        preprocessor = VideoPreprocessor.for_model(model.config, _preprocessor_dict(source),
                                                   **preprocessor_overrides)
    return VLM(model, tokenizer, preprocessor)


def _check_source(source: str) -> None:
    """Refuse a local-looking path that does not exist before transformers reads it as a hub id."""
    looks_local = source.startswith((".", "~")) or os.path.isabs(source) or source.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(source)):
        fail("name_or_path", "a hub id (org/name) or an existing model directory", repr(source))


def _check_architecture(source: str) -> None:
    """Refuse a checkpoint of another architecture: transformers would build a default-sized
    SmolVLM around it (billions of random weights) before noticing the mismatch."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as err:
        fail("name_or_path", "a SmolVLM2 checkpoint with a readable config.json", f"{source!r} ({err})")
    if model_type != "smolvlm":
        fail("name_or_path", "a SmolVLM2 checkpoint (config model_type 'smolvlm')",
             f"{source!r}, a {model_type!r} model")


def _preprocessor_dict(source: str) -> dict | None:
    """The model's ``preprocessor_config.json`` as a dict, or None when it has none."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        return ImageProcessingMixin.get_image_processor_dict(source)[0]
    except OSError:
        return None


def _restore_peft_base_weights(model: torch.nn.Module, info: dict, source: str) -> None:
    """Copy ``X.base_layer.weight`` of a PEFT-wrapped save into the missing ``X.weight``."""
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    base_keys = {key.replace(_PEFT_BASE, "."): key for key in unexpected if _PEFT_BASE in key}
    restorable = missing & base_keys.keys()
    still_missing = missing - restorable
    if still_missing:
        listed = f"{sorted(still_missing)[:8]}{' …' if len(still_missing) > 8 else ''}"
        fail("name_or_path", "a checkpoint with every weight of the model",
             f"{source!r}, which lacks weights of the model: {listed}")
    if not restorable:
        return
    tensors = _read_checkpoint_tensors(source, {base_keys[k] for k in restorable})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in restorable:
            params[key].copy_(tensors[base_keys[key]])


def _read_checkpoint_tensors(source: str, keys: set[str]) -> dict[str, torch.Tensor]:
    """Read ``keys`` from the safetensors files of a local directory or a (cached) hub repo."""
    from safetensors import safe_open

    directory = source
    if not os.path.isdir(directory):
        from huggingface_hub import snapshot_download

        directory = snapshot_download(source, allow_patterns=["*.safetensors"])
    found: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                found.update({key: f.get_tensor(key) for key in keys & set(f.keys())})
    if found.keys() != keys:
        fail("name_or_path", f"safetensors files holding {sorted(keys)[:4]}",
             f"{source!r}, without {sorted(keys - found.keys())[:4]}")
    return found
