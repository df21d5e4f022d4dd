"""Does something made for a base model fit the one it is used with: one check, one message.

A Frames2LoRA checkpoint, a hypernetwork and saved adapters are each made for one base model:
its text dimensions L, H and I (``num_layers``, ``hidden_size``, ``intermediate_size``; the
``down_proj`` maps I → H in each of L layers), plus the rank r for a checkpoint and a hash of
the ``down_proj`` weights for adapters. `base_dimensions` reads L, H and I from a model, a
transformers config or a record of them; `check_fits` compares what a thing was made for with
what it is used with and names every difference:

    checkpoint: expected a checkpoint made for this base model, got a checkpoint made for
    another base model: num_layers (L) is 4 in the checkpoint but 5 expected

A models-level module (it imports only torch and `v2l_fast.errors`), so that the hypernetwork's
checkpoint loader and the stack (`v2l_fast.api`, `v2l_fast.adapters`) share it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from v2l_fast.errors import fail

# Symbols of the compared fields in the messages (FRAMES2LORA_SPEC's notation).
SYMBOLS = {"num_layers": "L", "hidden_size": "H", "intermediate_size": "I", "rank": "r"}
# Base-model dimension → its name in a transformers text config.
_TEXT_CONFIG_FIELDS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
                       "intermediate_size": "intermediate_size"}


def base_dimensions(source: object, name: str = "model") -> dict[str, int]:
    """L, H and I of a base model as ``{"num_layers", "hidden_size", "intermediate_size"}``.

    ``source`` is a decoder model (read from its ``down_proj`` Linears, the modules adapters
    patch), a transformers VLM or text config, or a record of the three fields (a
    `Frames2LoRAConfig`, a base-model fingerprint dict). ``name`` names ``source`` in the
    error raised when it is none of these.
    """
    if isinstance(source, torch.nn.Module):
        from v2l_fast.vlm.lora_patch import down_proj_targets

        targets = down_proj_targets(source)
        return {"num_layers": len(targets), "hidden_size": targets[0].out_features,
                "intermediate_size": targets[0].in_features}
    if isinstance(source, Mapping):
        return {key: source.get(key) for key in _TEXT_CONFIG_FIELDS}
    text = getattr(source, "text_config", source)
    if all(isinstance(getattr(text, field, None), int) for field in _TEXT_CONFIG_FIELDS.values()):
        return {key: getattr(text, field) for key, field in _TEXT_CONFIG_FIELDS.items()}
    if all(isinstance(getattr(source, key, None), int) for key in _TEXT_CONFIG_FIELDS):
        return {key: getattr(source, key) for key in _TEXT_CONFIG_FIELDS}
    fail(name, "a model, a transformers VLM/text config or a Frames2LoRAConfig", type(source).__name__)


def check_fits(name: str, what: str, made_for: Mapping, used_with: Mapping, *,
               names: tuple[str, str] | None = None) -> None:
    """Refuse ``what`` (the argument ``name``) when the base model it was ``made_for`` differs
    from the one it is ``used_with``; the ValueError names every differing field.

    Each field of ``used_with`` is compared with the same field of ``made_for``. ``what`` is
    the thing with its article ("a checkpoint", "adapters"); ``names`` optionally gives the two
    base models' names (made for, used with) for the message.
    """
    differing = [key for key, value in used_with.items() if made_for.get(key) != value]
    if not differing:
        return
    noun = what.removeprefix("a ").removeprefix("an ")
    theirs, mine = (f" ({n!r})" if n else "" for n in (names or ("", "")))
    other = "with another rank" if differing == ["rank"] else f"for another base model{theirs}"
    details = "; ".join(f"{key}{f' ({SYMBOLS[key]})' if key in SYMBOLS else ''} is {made_for.get(key)!r} "
                        f"in the {noun} but {used_with[key]!r} expected" for key in differing)
    fail(name, f"{what} made for this base model{mine}", f"{what} made {other}: {details}")
