"""Generated adapters: the object `internalize` returns, and its safetensors file.

An `Adapters` holds the combined factors of n videos, ``A [n, L, R, I]`` and ``B [n, L, R, H]``
(docs/method.md §5: generated rows then the bias block, fp32), the scale α, the number of
trailing rows that are the hypernetwork's shared bias block (``bias_rank``; 0 when the factors
hold none, e.g. after the bias was folded into the base weights) and the fingerprint of the
base model they were generated for. The fingerprint (model name, text
dimensions and a hash of the ``down_proj`` weights) is saved with them, and adapters are
refused by a model whose dimensions or weights differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from v2l_fast.compat import base_dimensions, check_fits
from v2l_fast.errors import check_tensor, fail

FORMAT = "v2l_fast.adapters/1"
# Fingerprint fields that must match for adapters to fit a model (the name is informative only).
MATCHED_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "down_proj_sha256")  # dimensions first
_HASHED_VALUES_PER_LAYER = 1 << 16


def base_fingerprint(model: torch.nn.Module) -> dict:
    """Identity of a base model for adapter compatibility.

    ``name`` (informative only), ``num_layers``, ``hidden_size``, ``intermediate_size`` and
    ``down_proj_sha256``: a SHA-256 over an evenly strided sample of at most 65,536 values of
    every layer's ``down_proj`` weight, rounded to bf16 so that the same weights loaded in
    bf16 or fp32, on any device, hash alike. A sample, not every weight: it tells
    different checkpoints apart, it does not prove two are identical.
    """
    from v2l_fast.vlm.lora_patch import down_proj_targets

    targets = down_proj_targets(model)
    digest = hashlib.sha256()
    for module in targets:
        flat = module.weight.detach().reshape(-1)
        step = max(1, flat.numel() // _HASHED_VALUES_PER_LAYER)
        sample = flat[::step].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
        digest.update(sample.numpy().tobytes())
    config = getattr(model.config, "text_config", model.config)
    return {"name": getattr(model.config, "name_or_path", "") or "", **base_dimensions(model),
            "down_proj_sha256": digest.hexdigest(), "model_type": getattr(config, "model_type", "")}


@dataclass
class Adapters:
    """LoRA adapters of n videos for one base model.

    Attributes:
        A: ``[n, L, R, I]`` down factors (fp32).
        B: ``[n, L, R, H]`` up factors (fp32).
        alpha: the LoRA scale, applied as is (2·r^1.5).
        base: `base_fingerprint` of the model they belong to.
        bias_rank: how many trailing rank rows are the shared bias block (the same for every
            video of one hypernetwork); 0 when there is none.
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    base: dict
    bias_rank: int = 0

    def __post_init__(self):
        check_tensor("A", self.A, ndim=4, floating=True, shape_hint="[n, L, R, I]")
        check_tensor("B", self.B, ndim=4, floating=True, device=self.A.device, shape_hint="[n, L, R, H]")
        if self.A.shape[:3] != self.B.shape[:3]:
            fail("B", f"leading dims {list(self.A.shape[:3])} ([n, L, R], those of A)", list(self.B.shape))
        if type(self.bias_rank) is not int or not 0 <= self.bias_rank <= self.A.shape[2]:
            fail("bias_rank", f"an int in [0, {self.A.shape[2]}] (R of A)", self.bias_rank)
        dims = {"num_layers": self.A.shape[1], "intermediate_size": self.A.shape[3],
                "hidden_size": self.B.shape[3]}
        for key, size in dims.items():
            if key in self.base and self.base[key] != size:
                fail("base", f"{key} = {size} (from the factors' shapes)", self.base[key])

    def check_base(self, model: torch.nn.Module, name: str = "adapters") -> None:
        """Refuse ``model`` (ValueError naming each difference) if these adapters were made for
        another base model: `check_fingerprint` on the model's `base_fingerprint`."""
        self.check_fingerprint(base_fingerprint(model), name=name)

    def check_fingerprint(self, fingerprint: dict, name: str = "adapters") -> None:
        """Refuse these adapters (ValueError naming each difference) if they were made for
        another base model than the one ``fingerprint`` (a `base_fingerprint`) describes.

        No model needed: an adapter store checks adapters against a recorded fingerprint.
        The fields compared are L, H, I and ``down_proj_sha256``; the name is informative only.
        ``fingerprint`` must give L, H and I; without ``down_proj_sha256`` the weights are not
        compared (a fingerprint of dimensions only).
        """
        if not isinstance(fingerprint, dict) or any(key not in fingerprint for key in MATCHED_FIELDS[:3]):
            fail("fingerprint", f"a base-model fingerprint dict with {', '.join(MATCHED_FIELDS[:3])}",
                 fingerprint if not isinstance(fingerprint, dict) else f"keys {sorted(fingerprint)}")
        check_fits(name, "adapters", self.base, {key: fingerprint[key] for key in MATCHED_FIELDS if key in fingerprint},
                   names=(self.base.get("name"), fingerprint.get("name")))

    def __len__(self) -> int:
        return self.A.shape[0]

    def __getitem__(self, index) -> Adapters:
        """Adapters of the selected videos (an int, a slice, or a list of indices)."""
        if isinstance(index, int):
            index = [index]
        return Adapters(self.A[index], self.B[index], self.alpha, self.base, self.bias_rank)

    @property
    def rank(self) -> int:
        """R, the rank rows of every adapter (generated rows plus the bias block)."""
        return self.A.shape[2]

    def bias_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared bias block of adapter 0, ``(bias_A [L, bias_rank, I], bias_B [L, bias_rank, H])``."""
        if self.bias_rank == 0:
            fail("adapters", "adapters that carry the bias block (bias_rank > 0)", "bias_rank 0")
        return self.A[0, :, -self.bias_rank:], self.B[0, :, -self.bias_rank:]

    def without_bias(self) -> Adapters:
        """The per-video rows only (rank R − bias_rank, bias_rank 0): what a base model with the
        bias block folded into its ``down_proj`` weights serves (`v2l_fast.adapters.fold.fold_bias`)."""
        keep = self.rank - self.bias_rank
        return Adapters(self.A[:, :, :keep], self.B[:, :, :keep], self.alpha, self.base, 0)

    @staticmethod
    def cat(parts: list[Adapters]) -> Adapters:
        """Concatenate adapters of the same base model along the video axis."""
        if not parts:
            fail("parts", "at least one Adapters", "an empty list")
        for i, part in enumerate(parts[1:], 1):
            if (part.base, part.alpha, part.bias_rank) != (parts[0].base, parts[0].alpha, parts[0].bias_rank):
                fail(f"parts[{i}]", "adapters of the same base model, alpha and bias_rank as parts[0]",
                     f"base {part.base.get('name')!r}, alpha {part.alpha}, bias_rank {part.bias_rank}")
        return Adapters(torch.cat([p.A for p in parts]), torch.cat([p.B for p in parts]),
                        parts[0].alpha, parts[0].base, parts[0].bias_rank)

    def to(self, device) -> Adapters:
        """The adapters on ``device``."""
        return Adapters(self.A.to(device), self.B.to(device), self.alpha, self.base, self.bias_rank)

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: tensors ``A``, ``B``; alpha, bias_rank and base fingerprint
        as metadata."""
        from safetensors.torch import save_file

        metadata = {"format": FORMAT, "alpha": repr(float(self.alpha)), "base": json.dumps(self.base),
                    "bias_rank": str(self.bias_rank)}
        save_file({"A": self.A.detach().contiguous().cpu(), "B": self.B.detach().contiguous().cpu()},
                  os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: torch.nn.Module | None = None,
             device: str | torch.device = "cpu") -> Adapters:
        """Read adapters written by `save`; with ``model``, refuse them if made for another base."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT:
                    fail("path", f"a v2l_fast adapters file (format {FORMAT!r})",
                         f"{path!r} with format {metadata.get('format')!r}")
                A, B = f.get_tensor("A"), f.get_tensor("B")
        except (SafetensorError, FileNotFoundError, OSError) as err:
            fail("path", "a readable v2l_fast adapters file", f"{path!r}, from which safetensors cannot read adapters: "
                 f"{err}")
        try:
            alpha, base = float(metadata["alpha"]), json.loads(metadata["base"])
            bias_rank = int(metadata.get("bias_rank", "0"))
        except (KeyError, ValueError) as err:
            fail("path", "a v2l_fast adapters file with alpha, base and bias_rank metadata",
                 f"{path!r}, whose metadata is incomplete or malformed ({type(err).__name__}: {err})")
        if not isinstance(base, dict):
            fail("path", "a v2l_fast adapters file whose base metadata is a JSON object", f"{path!r}")
        adapters = cls(A, B, alpha, base, bias_rank)
        if model is not None:
            adapters.check_base(model, name=f"adapters in {path!r}")
        return adapters
