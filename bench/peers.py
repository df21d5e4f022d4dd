"""Benchmark peers: the authors' code, imported from ``$V2L_AUTHORS_CODE`` (never part of
v2l_fast), and peft's multi-adapter LoRA (`peft_lora_model`).

FRAMES2LORA_SPEC describes package ``ctx_to_lora`` of video2lora/Video2LoRA. The benchmarks
import it from the paths in ``$V2L_AUTHORS_CODE`` (os.pathsep-separated: the repository's
``src`` and a directory holding its einops / jaxtyping if the venv lacks them); without it,
their rows say "not available". Nothing of it is copied here: `authors_code` imports it,
`authors_hypernet` builds their ``HyperLoRA`` around a v2l_fast hypernetwork's weights.
"""

from __future__ import annotations

import functools
import os
import types

import torch

AUTHORS_ENV = "V2L_AUTHORS_CODE"
NOT_AVAILABLE = f"the authors' code is not available (set ${AUTHORS_ENV})"


def _shim_authors_imports() -> None:
    """The two shims the spec's fixture run used under transformers 5 (docs/method.md §10):
    the removed ``_prepare_4d_attention_mask`` with its transformers-4.51.3 semantics, and a stub
    of the text data module (it imports ``datasets``; the hypernetwork does not use it)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("transformers.modeling_attn_mask_utils") is None:
        def prepare_4d_attention_mask(mask, dtype, tgt_len=None):
            bsz, src_len = mask.shape
            inverted = 1.0 - mask[:, None, None, :].expand(bsz, 1, tgt_len or src_len, src_len).to(dtype)
            return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)

        masks = types.ModuleType("transformers.modeling_attn_mask_utils")
        masks._prepare_4d_attention_mask = prepare_4d_attention_mask
        sys.modules[masks.__name__] = masks
    data = types.ModuleType("ctx_to_lora.data.processing")
    data.tokenize_ctx_text = None
    sys.modules.setdefault(data.__name__, data)


@functools.cache
def authors_code() -> types.SimpleNamespace | None:
    """The authors' modules used by the benchmarks (``HyperLoRA``, ``HypernetConfig``,
    ``AggregatorConfig``, ``combine_lora``, ``lora_forward``), or None when $V2L_AUTHORS_CODE
    is unset."""
    paths = os.environ.get(AUTHORS_ENV)
    if not paths:
        return None
    import sys

    sys.path[:0] = [p for p in paths.split(os.pathsep) if p not in sys.path]
    _shim_authors_imports()
    from ctx_to_lora.modeling.aggregator import AggregatorConfig
    from ctx_to_lora.modeling.hypernet import HyperLoRA, HypernetConfig
    from ctx_to_lora.modeling.lora_layer import lora_forward
    from ctx_to_lora.modeling.lora_merger import combine_lora

    return types.SimpleNamespace(AggregatorConfig=AggregatorConfig, HyperLoRA=HyperLoRA, HypernetConfig=HypernetConfig,
                                 combine_lora=combine_lora, lora_forward=lora_forward)


def authors_hypernet(ours, device) -> torch.nn.Module | None:
    """The authors' ``HyperLoRA`` holding the weights of ``ours`` (a `Frames2LoRA`; strict
    state-dict load: same parameter names and shapes), or None without their code."""
    code = authors_code()
    if code is None:
        return None
    from peft import LoraConfig

    c = ours.config
    L, H, I, r, D = c.num_layers, c.hidden_size, c.intermediate_size, c.rank, c.latent_size
    aggregator = code.AggregatorConfig(
        aggregator_type="perceiver", num_layers=L, num_modules=1, num_extra_modules=0, output_size=D,
        feature_size=H, pooling_type=None, num_latent_factor=None, lora_r=r, per_rank_gen=True,
        n_latent_queries=c.num_latent_queries, num_blocks=c.num_blocks,
        num_self_attn_per_block=c.num_self_attn_per_block, shared_weights=False, layer_to_layer_ctx_encoder=True)
    config = code.HypernetConfig(
        latent_size=D, use_light_weight_lora=False, light_weight_latent_size=None, per_rank_gen=True,
        use_per_rank_bias=False, use_bias=True, per_layer_processing=False, use_token_mixing=False,
        num_pre_head_layers=c.num_pre_head_layers, dropout_rate=0.0,
        lora_config=LoraConfig(r=r, lora_alpha=c.lora_alpha, target_modules=["down_proj"]), extra_modules=None,
        base_hidden_size=H, layer_indices=torch.arange(L), feature_sizes=({"down_proj": I}, {"down_proj": H}),
        aggregator_config=aggregator)
    with torch.device(device):
        theirs = code.HyperLoRA(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs.train(ours.training)


def authors_adapters(theirs, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of every video as their ``infer.py`` makes them (§8 steps 2–3): their
    ``generate_weights`` and ``combine_lora`` with one chunk per video and the head's bias."""
    code = authors_code()
    mask = torch.ones(features.shape[0], features.shape[2], dtype=torch.long, device=features.device)
    loras, _ = theirs.generate_weights(features, mask)
    ones = torch.ones(features.shape[0], dtype=torch.long, device=features.device)
    combined = code.combine_lora(loras, ones, lora_bias=theirs.get_head_bias())["down_proj"]
    return combined["A"], combined["B"]


def peft_lora_model(model, A: torch.Tensor, B: torch.Tensor, alpha: float):
    """Wrap ``model`` with peft: adapter i (``A [n, L, R, I]``, ``B [n, L, R, H]``, delta
    ``alpha · (x Aᵀ) B``) as LoRA adapter ``video{i}`` on every down_proj, weights copied in.

    peft scales by ``lora_alpha / r``, so ``lora_alpha = alpha · R``. Returns the PeftModel (eval
    mode) and the adapter names; pass ``adapter_names=`` to ``generate`` for a mixed batch, or
    ``set_adapter`` one at a time. Undo with ``peft_model.unload()``.
    """
    from peft import LoraConfig, get_peft_model

    from v2l_fast.vlm.lora_patch import down_proj_targets

    rank = A.shape[2]
    config = LoraConfig(r=rank, lora_alpha=alpha * rank, target_modules=["down_proj"])
    names = [f"video{i}" for i in range(A.shape[0])]
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    with torch.no_grad():
        for l, down in enumerate(down_proj_targets(peft_model)):
            for i, name in enumerate(names):
                down.lora_A[name].weight.copy_(A[i, l])
                down.lora_B[name].weight.copy_(B[i, l].T)
    return peft_model.eval(), names
