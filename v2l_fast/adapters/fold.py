"""The bias fold: the hypernetwork's shared bias block, added once to the base ``down_proj`` weights.

Every adapter of one hypernetwork ends with the same bias block (docs/method.md §5): rows
``bias_A [L, r, I]`` and ``bias_B [L, r, H]`` that do not depend on the video. Their delta
``α · bias_Bᵀ bias_A`` can therefore live in the base weights instead of in every adapter:
`fold_bias` adds it to each layer's ``down_proj`` weight once, and the folded model then serves
only the per-video rows (`Adapters.without_bias`, rank R − r), half of the adapter bytes per
decode step at the released rank.

`fold_bias` returns a `FoldedBias` record (α, a SHA-256 digest of the bias block and the
fingerprints of the model before and after the fold) and marks the model with it, in its config
(``config.v2l_fast_folded_bias``), so that a folded model saved with ``save_pretrained`` and
loaded again is still known to be folded and is never folded twice. Adapters generated for the
unfolded model are checked against the record (`FoldedBias.check`: same base, same bias block)
and rebased onto the folded model by `FoldedBias.strip`.

Numerics: the delta is computed in fp64 and added to the weight in fp64, then rounded once to
the weight's dtype. In fp32 the folded model matches the unfolded one with full adapters to
rounding; in bf16 the folded weight carries one bf16 rounding of ``W + ΔW_bias`` where the
unfolded model adds an fp32 bias delta to a bf16 base output, so logits agree to bf16
precision, not bitwise (tests/test_adapters_fold.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from v2l_fast.adapters.core import MATCHED_FIELDS, Adapters, base_fingerprint
from v2l_fast.compat import check_fits
from v2l_fast.errors import check_tensor, fail

# Name of the marker in the model's config (saved in config.json by save_pretrained).
CONFIG_KEY = "v2l_fast_folded_bias"


def bias_digest(bias_A: torch.Tensor, bias_B: torch.Tensor) -> str:
    """SHA-256 (hex) of a bias block: the shapes, then the fp32 bytes of ``bias_A`` and ``bias_B``."""
    digest = hashlib.sha256()
    for t in (bias_A, bias_B):
        flat = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(repr(list(flat.shape)).encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class FoldedBias:
    """What `fold_bias` folded into a model.

    Attributes:
        alpha: the LoRA scale the block was folded with.
        digest: `bias_digest` of the folded block.
        rank: r, the rows of the bias block.
        base: `base_fingerprint` of the model before the fold (what its adapters were made for).
        folded_base: `base_fingerprint` of the model after the fold.
    """

    alpha: float
    digest: str
    rank: int
    base: dict
    folded_base: dict

    def check(self, adapters: Adapters, name: str = "adapters") -> None:
        """Refuse ``adapters`` (ValueError) unless they were made for the unfolded model, with the
        same alpha, and every one of them ends with exactly the folded bias block."""
        if not isinstance(adapters, Adapters):
            fail(name, "an Adapters", type(adapters).__name__)
        check_fits(name, "adapters", adapters.base, {key: self.base[key] for key in MATCHED_FIELDS},
                   names=(adapters.base.get("name"), self.base.get("name")))
        if adapters.alpha != self.alpha:
            fail(name, f"adapters of alpha {self.alpha} (the folded bias block's)", f"alpha {adapters.alpha}")
        if adapters.bias_rank != self.rank:
            fail(name, f"adapters whose last {self.rank} rows are the bias block (bias_rank {self.rank})",
                 f"bias_rank {adapters.bias_rank}")
        bias_A, bias_B = adapters.bias_block()
        tail = slice(adapters.rank - self.rank, adapters.rank)
        same = all(torch.equal(adapters.A[i, :, tail], bias_A) and torch.equal(adapters.B[i, :, tail], bias_B)
                   for i in range(len(adapters)))
        got = bias_digest(bias_A, bias_B)
        if not same or got != self.digest:
            fail(name, f"adapters carrying the folded bias block (digest {self.digest[:12]}…)",
                 f"a different bias block (digest {got[:12]}…{'' if same else ', and not the same in every adapter'})")

    def strip(self, adapters: Adapters, name: str = "adapters") -> Adapters:
        """``adapters`` for the folded model: `check`, then their per-video rows only
        (`Adapters.without_bias`), tagged with the folded model's fingerprint."""
        self.check(adapters, name)
        rows = adapters.without_bias()
        return Adapters(rows.A, rows.B, rows.alpha, dict(self.folded_base), 0)

    def to_dict(self) -> dict:
        """The record as a JSON-ready dict (what the model's config carries)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> FoldedBias:
        """The record `to_dict` wrote."""
        return cls(float(record["alpha"]), record["digest"], int(record["rank"]), dict(record["base"]),
                   dict(record["folded_base"]))


def folded_bias_of(model: torch.nn.Module) -> FoldedBias | None:
    """The `FoldedBias` a model carries (set by `fold_bias`, kept by ``save_pretrained``), or None."""
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return FoldedBias.from_dict(record) if record else None


def read_folded_bias(directory: str | os.PathLike) -> FoldedBias:
    """The `FoldedBias` record in the ``config.json`` of a folded model saved with ``save_pretrained``
    (e.g. by `v2l_fast.adapters.peft.export_folded_base`), without loading the model."""
    path = os.path.join(os.fspath(directory), "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle).get(CONFIG_KEY)
    except (OSError, ValueError, AttributeError) as err:
        fail("directory", "a saved model directory with a readable config.json", f"{path!r} ({err})")
    if not record:
        fail("directory", f"a folded base model (config.json with {CONFIG_KEY!r}, written by export_folded_base)",
             f"{os.fspath(directory)!r}, whose config.json has none")
    return FoldedBias.from_dict(record)


def fold_bias(model: torch.nn.Module, bias_A: torch.Tensor, bias_B: torch.Tensor, alpha: float) -> FoldedBias:
    """Add ``alpha · bias_B[l]ᵀ bias_A[l]`` to every decoder layer l's ``down_proj`` weight, in place.

    Args:
        model: a SmolVLM2 (or transformers decoder) not folded before and without a LoRA patch.
        bias_A: ``[L, r, I]`` the bias block's down factors (e.g. ``Adapters.bias_block()[0]``,
            or a Frames2LoRA's ``bias_A["down_proj"]``).
        bias_B: ``[L, r, H]`` its up factors (rank-major, as v2l_fast keeps them).
        alpha: the adapters' LoRA scale (2·r^1.5), applied as is.

    Returns:
        The `FoldedBias` record, also stored in ``model.config`` (`folded_bias_of`). Serve the
        folded model with ``record.strip(adapters)``.
    """
    from v2l_fast.vlm.lora_patch import down_proj_targets, is_patched

    done = folded_bias_of(model)
    if done is not None:
        fail("model", "a model whose down_proj weights hold no folded bias block yet",
             f"a model already folded (bias digest {done.digest[:12]}…)")
    if is_patched(model):
        fail("model", "a model without a LoRA patch while folding", "a patched model")
    targets = down_proj_targets(model)
    check_tensor("bias_A", bias_A, ndim=3, floating=True, shape_hint="[L, r, I]")
    check_tensor("bias_B", bias_B, ndim=3, floating=True, shape_hint="[L, r, H]")
    L, I, H = len(targets), targets[0].in_features, targets[0].out_features
    if tuple(bias_A.shape) != (L, bias_A.shape[1], I) or bias_A.shape[1] == 0:
        fail("bias_A", f"shape [L, r, I] = [{L}, r ≥ 1, {I}] (the model's layers and down_proj in_features)",
             list(bias_A.shape))
    if tuple(bias_B.shape) != (L, bias_A.shape[1], H):
        fail("bias_B", f"shape [L, r, H] = [{L}, {bias_A.shape[1]}, {H}] (layers, r of bias_A, out_features)",
             list(bias_B.shape))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        fail("alpha", "a positive finite float", repr(alpha))
    base = base_fingerprint(model)
    with torch.no_grad():
        for layer, module in enumerate(targets):
            weight = module.weight
            work = torch.float32 if weight.device.type == "mps" else torch.float64  # MPS has no fp64
            a = bias_A[layer].to(device=weight.device, dtype=work)
            b = bias_B[layer].to(device=weight.device, dtype=work)
            weight.copy_((weight.to(work) + float(alpha) * (b.mT @ a)).to(weight.dtype))
    record = FoldedBias(float(alpha), bias_digest(bias_A, bias_B), int(bias_A.shape[1]), base, base_fingerprint(model))
    setattr(model.config, CONFIG_KEY, record.to_dict())
    return record
