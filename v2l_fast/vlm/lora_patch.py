"""Attach a batch of LoRA adapters to Linear modules of any transformers decoder.

`LoRAPatch` adds ``scaling · (x Aᵀ) B`` of adapter ``b`` to batch row ``b`` of every target
Linear, through the `lora_sgmv` backend resolved when the patch is built. Adapters are a
stacked pool ``A [n, L, R, I]``, ``B [n, L, R, O]``; each target module is bound to one layer
index of the pool. Frames2LoRA targets every decoder layer's ``mlp.down_proj``
(`down_proj_targets`); a Doc-to-LoRA / Text-to-LoRA style hypernetwork passes its own modules.

Mechanics: one forward hook per target module, no change to the modules themselves, nothing
global. It works inside ``model.generate``: the prefill and every decode step see ``x`` of
shape ``[rows, T, I]``, and the segment metadata (row b = tokens ``[b·T, (b+1)·T)``, adapter
``row_adapters[b]``) is built from that shape on the device, without a host sync, once per
shape and shared by all layers. Under ``torch.compile`` each hook call is one
``torch.ops.v2l_fast.lora_sgmv`` node.

Numerics (docs/method.md §9): ``lora_sgmv`` upcasts x to fp32 against fp32 adapters, adds
the fp32 delta to the base output in fp32 and casts the sum back to the output dtype.

Threads: patches of different models are independent. One model carries at most one patch
at a time (a second `LoRAPatch` on a patched module raises); two threads that run the same
patched model share its adapters, so serve different adapter batches of one model from one
thread (or one model copy per thread).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from v2l_fast import ops
from v2l_fast.errors import check_dim, check_tensor, describe, fail
from v2l_fast.ops import checks
from v2l_fast.ops.lora_sgmv import kernel_segments
from v2l_fast.ops.registry import Arguments


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM or SmolVLM (text decoder only)."""
    candidates = [model.get_decoder()] if hasattr(model, "get_decoder") else []
    candidates.append(model)
    for root in candidates:
        for attr in ("layers", "text_model.layers", "model.layers", "model.text_model.layers"):
            obj = root
            for part in attr.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.nn.ModuleList):
                return obj
    fail("model", "a transformers decoder with a `layers` ModuleList", type(model).__name__)


def down_proj_targets(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Every text decoder layer's ``mlp.down_proj``, in layer order (the Frames2LoRA targets)."""
    return [layer.mlp.down_proj for layer in decoder_layers(model)]


def _has_patch(module: torch.nn.Module) -> bool:
    return any(isinstance(hook, _LoRAHook) for hook in module._forward_hooks.values())


def is_patched(model: torch.nn.Module) -> bool:
    """Whether any submodule of ``model`` carries an active `LoRAPatch`."""
    return any(_has_patch(module) for module in model.modules())


class _LoRAHook:
    """Forward hook of one target module: adds its layer's adapters to the module's output.

    The per-call work is a dict lookup of the batch's segments and one call of the backend
    resolved when the patch was built: no backend lookup, no argument checks.
    """

    def __init__(self, patch: LoRAPatch, layer: int):
        self.patch = patch
        self.A, self.B = patch.layer_factors(layer)

    def __call__(self, module, args, output):
        x, patch = args[0], self.patch
        tokens = x.flatten(0, -2)  # [rows · T, I]; rows = x.shape[0]
        indptr, adapters, work, block_m = patch.segments(x.shape[0], tokens.shape[0] // max(x.shape[0], 1), x.device)
        out = patch.kernel(tokens, self.A, self.B, indptr, adapters, patch.ranks, patch.scaling,
                           output.flatten(0, -2), work, block_m)
        return out.view(output.shape)


class LoRAPatch:
    """Adapters on target Linear modules; a context manager, or call `remove` explicitly.

    Args:
        targets: the Linear modules to patch (e.g. `down_proj_targets(model)`).
        A: ``[n, L, R, I]`` adapter down factors (``I`` = the targets' in_features).
        B: ``[n, L, R, O]`` adapter up factors (``O`` = the targets' out_features).
        scaling: the LoRA scale, applied as is (Frames2LoRA: α = 2·r^1.5).
        layers: pool layer of each target (default: target i uses layer i).
        row_adapters: ``[rows]`` adapter id of each batch row, −1 for none (default: row b
            uses adapter b, and the batch must have n rows).
        ranks: optional ``[n]`` effective rank of each adapter (see `lora_sgmv`).
        backend: `lora_sgmv` backend, resolved once, here ("auto": `v2l_fast.ops.use_backend`,
            ``$V2L_BACKEND`` or the fastest); `kernel.backend` names the choice.

    Everything is validated here, once; each hook call then runs the resolved kernel with
    no checks. Adapters are moved to the targets' device (dtype kept: pass fp32 for the spec's
    numerics). The hooks hold references, not copies: do not modify A/B while patched.
    """

    def __init__(self, targets: Sequence[torch.nn.Module], A: torch.Tensor, B: torch.Tensor,
                 scaling: float, *, layers: Sequence[int] | None = None,
                 row_adapters: torch.Tensor | None = None, ranks: torch.Tensor | None = None,
                 backend: str = "auto"):
        targets = list(targets)
        if not targets:
            fail("targets", "at least one Linear module", "an empty list")
        for i, module in enumerate(targets):
            if not isinstance(module, torch.nn.Linear):
                fail(f"targets[{i}]", "a torch.nn.Linear", type(module).__name__)
            if _has_patch(module):
                fail(f"targets[{i}]", "a module without a LoRA patch (remove the other patch first)",
                     "a module that is already patched")
        layers = list(range(len(targets))) if layers is None else list(layers)
        if len(layers) != len(targets):
            fail("layers", f"one layer index per target ({len(targets)})", f"{len(layers)} indices")
        device = targets[0].weight.device
        check_tensor("A", A, ndim=4, floating=True, shape_hint="[n, L, R, I]")
        check_tensor("B", B, ndim=4, floating=True, shape_hint="[n, L, R, O]")
        A, B = A.to(device), B.to(device)
        for i, (module, layer) in enumerate(zip(targets, layers)):
            if not isinstance(layer, int) or not 0 <= layer < A.shape[1]:
                fail(f"layers[{i}]", f"an int in [0, {A.shape[1]}) (L of A)", layer)
            check_dim("A", A, -1, module.in_features, f"in_features of targets[{i}]")
            check_dim("B", B, -1, module.out_features, f"out_features of targets[{i}]")
        if row_adapters is not None:
            row_adapters = row_adapters.to(device)
        if ranks is not None:
            ranks = ranks.to(device)
        self.A, self.B, self.scaling, self.ranks = A, B, float(scaling), ranks
        self.kernel = ops.resolve("lora_sgmv", backend, device)
        # Per-layer [n, R, ·] views: in training, autograd then stacks the layers' gradients
        # into the pool once instead of adding a full-pool zero gradient per layer.
        self._A_layers, self._B_layers = A.unbind(1), B.unbind(1)
        self.row_adapters = row_adapters
        rows = A.shape[0] if row_adapters is None else row_adapters.shape[0]
        indptr, adapters = self._build_segments(rows, 1, device)
        checks.lora_sgmv(Arguments(x=A.new_zeros(rows, A.shape[-1]), A=A, B=B, seg_indptr=indptr,
                                         seg_adapter=adapters, ranks=ranks, layer=0, base=None), values=True)
        self._segments: dict[tuple, tuple] = {}
        self._handles = [module.register_forward_hook(_LoRAHook(self, layer))
                         for module, layer in zip(targets, layers)]

    def layer_factors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s adapter factors, ``([n, R, I], [n, R, O])`` views of the pool."""
        return self._A_layers[layer], self._B_layers[layer]

    @property
    def num_rows(self) -> int:
        """Batch rows the patched model must be run with."""
        return self.A.shape[0] if self.row_adapters is None else self.row_adapters.shape[0]

    def _build_segments(self, rows: int, tokens_per_row: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        indptr = torch.arange(rows + 1, device=device, dtype=torch.int64) * tokens_per_row
        if self.row_adapters is not None:
            return indptr, self.row_adapters.to(torch.int64)
        return indptr, torch.arange(rows, device=device, dtype=torch.int64)

    def segments(self, rows: int, tokens_per_row: int, device) -> tuple:
        """``(seg_indptr, seg_adapter, work, block_m)`` kernel arguments for ``rows`` ×
        ``tokens_per_row`` tokens, built once per input shape and reused by every patched layer."""
        if rows != self.num_rows:
            fail("model input", f"{self.num_rows} batch rows (one per adapter row of the patch)",
                 f"{rows} rows")
        key = (rows, tokens_per_row, device)
        if key not in self._segments:
            indptr, adapters = self._build_segments(rows, tokens_per_row, device)
            work, block_m = kernel_segments(self.kernel, indptr, adapters, rows * tokens_per_row, self.A.shape[0])
            self._segments[key] = (indptr, adapters, work, block_m)
        return self._segments[key]

    def remove(self) -> None:
        """Detach the adapters; the modules compute their base output again. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._segments.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are still attached."""
        return bool(self._handles)

    def __enter__(self) -> LoRAPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"LoRAPatch({len(self._handles)} modules, A {describe(self.A)}, scaling {self.scaling}, "
                f"{'active' if self.active else 'removed'})")
