"""Frames2LoRA hypernetwork module vs the authors' fixture (FRAMES2LORA_SPEC §3–§5, §10)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from golden import OFFICIAL_CKPT, golden_tensors

from v2l_fast import ops
from v2l_fast.hypernet import (
    Frames2LoRA,
    Frames2LoRAConfig,
    combine_lora,
    load_frames2lora,
)
from v2l_fast.hypernet.model import l2_normalize
from v2l_fast.hypernet.perceiver import PerceiverLayer
from v2l_fast.ops.registry import runtime_missing
from v2l_fast.testing import assert_rel_close, rel_error
from v2l_fast.vlm.factory import smolvlm_config

FIXTURE_TOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    return golden_tensors()


@pytest.fixture(scope="module", params=["state_dict", "official_pt"])
def hypernet(request, fixture):
    """The fixture hypernetwork, from its tensors and, separately, from the official .pt."""
    if request.param == "state_dict":
        source = {k.removeprefix("hypernet."): v for k, v in fixture.items() if k.startswith("hypernet.")}
    else:
        source = OFFICIAL_CKPT
    return load_frames2lora(source)


def tiny_config(**overrides) -> Frames2LoRAConfig:
    fields = dict(num_layers=3, hidden_size=48, intermediate_size=80, rank=4, latent_size=32,
                  num_latent_queries=5, num_blocks=2, num_heads=4, head_dim=16, num_kv_heads=2)
    fields.update(overrides)
    return Frames2LoRAConfig(**fields)


def perturbed(model: Frames2LoRA, seed: int = 0) -> Frames2LoRA:
    """Move the zero-initialised parameters off zero so outputs are discriminative."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or p.abs().max() == 0 or bool((p == 1).all()):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def test_fixture_architecture_inferred(hypernet):
    cfg = hypernet.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.rank) == (4, 64, 128, 4)
    assert (cfg.latent_size, cfg.num_latent_queries, cfg.num_blocks, cfg.num_self_attn_per_block) == (32, 6, 3, 0)
    assert (cfg.num_heads, cfg.head_dim, cfg.num_kv_heads) == (16, 128, 4)
    assert cfg.lora_alpha == 16.0


@torch.no_grad()
def test_fixture_intermediates(hypernet, fixture):
    # mid.* keep the official module axis (M = 1) at dim 2.
    latents = hypernet.aggregate(fixture["in.features"], fixture["in.mask"])
    assert_rel_close(latents, fixture["mid.perceiver_out"].squeeze(2), tol=FIXTURE_TOL)
    pre_head = hypernet.pre_head(latents)
    assert_rel_close(pre_head, fixture["mid.pre_head"].squeeze(2), tol=FIXTURE_TOL)
    normed = l2_normalize(pre_head)
    assert_rel_close(normed, fixture["mid.head_in_l2normed"].squeeze(2), tol=FIXTURE_TOL)
    assert_rel_close(hypernet.head(normed), fixture["mid.head_out"].squeeze(2), tol=FIXTURE_TOL)


@torch.no_grad()
def test_fixture_adapters(hypernet, fixture):
    out = hypernet.generate(fixture["in.features"], fixture["in.mask"])
    assert out.A.shape == (2, 4, 8, 128) and out.B.shape == (2, 4, 8, 64)
    assert out.A.dtype == out.B.dtype == torch.float32
    assert out.alpha == 2 * 4 ** 1.5
    for name, ref in (("generated_A", "out.A"), ("generated_B", "out.B"), ("A", "out.A_combined"),
                      ("B", "out.B_combined"), ("bias_A", "out.bias_A"), ("bias_B", "out.bias_B")):
        assert_rel_close(getattr(out, name), fixture[ref], tol=FIXTURE_TOL)


@torch.no_grad()
def test_fixture_e2e_adapters_from_vlm_features(hypernet, fixture):
    """Features extracted by the official code from the tiny VLM give the official adapters."""
    out = hypernet.generate(fixture["e2e.features"], fixture["e2e.mask"])
    assert_rel_close(out.A, fixture["e2e.A_combined"], tol=FIXTURE_TOL)
    assert_rel_close(out.B, fixture["e2e.B_combined"], tol=FIXTURE_TOL)


@torch.no_grad()
def test_fixture_alpha_is_applied_undivided(hypernet, fixture):
    """The official patched down_proj output is ``x Wᵀ + alpha·(x Aᵀ) B`` with our A, B, alpha."""
    out = hypernet.generate(fixture["in.features"], fixture["in.mask"])
    x = fixture["lora.x"]  # [B, T, I]; video b's adapter applies to row b
    for layer in range(hypernet.config.num_layers):
        base = x @ fixture["lora.down_proj_weight"][layer].T
        assert_rel_close(base, fixture["lora.base_out"][layer], tol=FIXTURE_TOL)
        delta = out.alpha * (x @ out.A[:, layer].mT) @ out.B[:, layer]
        assert_rel_close(base + delta, fixture["lora.out"][layer], tol=FIXTURE_TOL)
        assert rel_error(base, fixture["lora.out"][layer]) > 1e-3  # the delta matters here


# Each backend's implementations by import path, so that the test holds the kernels themselves to
# the fixture whatever the registry currently maps the backend name to.
KERNELS = {
    "torch": {"perceiver_attention": "v2l_fast.kernels.perceiver_attention_torch:perceiver_attention",
              "swiglu_mlp": "v2l_fast.kernels.swiglu_mlp_torch:swiglu_mlp"},
    "triton": {"perceiver_attention": "v2l_fast.kernels.perceiver_attention:perceiver_attention",
               "swiglu_mlp": "v2l_fast.kernels.swiglu_mlp:swiglu_mlp"},
}


@torch.no_grad()
@pytest.mark.parametrize("backend", list(KERNELS))
def test_fixture_through_each_backend(backend, fixture, device, monkeypatch):
    """`use_backend` switches every Perceiver op to the backend's kernels; adapters stay official."""
    missing = runtime_missing(backend, device)
    if missing:
        pytest.skip(missing)
    calls = {op: 0 for op in KERNELS[backend]}
    for op, path in KERNELS[backend].items():
        module, name = path.split(":")
        kernel = getattr(importlib.import_module(module), name)

        def counting(*args, op=op, kernel=kernel):
            calls[op] += 1
            return kernel(*args)

        monkeypatch.setitem(getattr(ops, op).op.backends, backend, counting)
    model = load_frames2lora(OFFICIAL_CKPT, device=device)
    with ops.use_backend(backend):
        out = model.generate(fixture["in.features"].to(device), fixture["in.mask"].to(device),
                             autocast=False)
    blocks = model.config.num_blocks + 1  # every encoder layer and the decoder
    assert calls == {"perceiver_attention": blocks, "swiglu_mlp": blocks + 1}  # + the projection
    # On a GPU the Triton kernels' fp32 dots may use TF32.
    tol = FIXTURE_TOL if device.type == "cpu" or backend == "torch" else 1e-3
    assert_rel_close(out.A.cpu(), fixture["out.A_combined"], tol=tol)
    assert_rel_close(out.B.cpu(), fixture["out.B_combined"], tol=tol)


@torch.no_grad()
def test_fixture_multi_chunk_composition(hypernet, fixture):
    chunks = hypernet.generate(fixture["multi.features"], fixture["multi.mask"])
    assert_rel_close(chunks.generated_A, fixture["multi.A"], tol=FIXTURE_TOL)
    assert_rel_close(chunks.generated_B, fixture["multi.B"], tol=FIXTURE_TOL)
    A, B = combine_lora(chunks.generated_A, chunks.generated_B, fixture["multi.n_chunks"],
                        bias=(chunks.bias_A, chunks.bias_B))
    assert A.shape == (2, 4, 12, 128) and B.shape == (2, 4, 12, 64)
    assert_rel_close(A, fixture["multi.A_combined"], tol=FIXTURE_TOL)
    assert_rel_close(B, fixture["multi.B_combined"], tol=FIXTURE_TOL)
    assert not A[1, :, 8:].any() and not B[1, :, 8:].any()  # rows past group 1's bias are zero


@torch.no_grad()
def test_padded_positions_do_not_change_the_output(hypernet, fixture):
    features, mask = fixture["in.features"].clone(), fixture["in.mask"]
    reference = hypernet.generate(features, mask)
    padded = ~mask.bool()
    assert padded[1].any(), "fixture row 1 is right-padded"
    features[padded[:, None, :].expand(-1, features.shape[1], -1)] = 1e3
    noisy = hypernet.generate(features, mask)
    assert torch.equal(noisy.A, reference.A) and torch.equal(noisy.B, reference.B)
    # The padded video alone, cut to its real tokens, gets the same adapter.
    real = int(mask[1].sum())
    alone = hypernet.generate(features[1:, :, :real], mask[1:, :real])
    assert_rel_close(alone.A[0], reference.A[1], tol=1e-6)
    assert_rel_close(alone.B[0], reference.B[1], tol=1e-6)


@torch.no_grad()
def test_batch_equals_one_by_one():
    model = perturbed(Frames2LoRA(tiny_config()))
    features = torch.randn(3, 3, 7, 48)
    batch = model.generate(features)
    for b in range(3):
        single = model.generate(features[b:b + 1])
        assert_rel_close(single.A[0], batch.A[b], tol=1e-6)
        assert_rel_close(single.B[0], batch.B[b], tol=1e-6)


def test_projection_in_chunks_without_grad_equals_one_pass(monkeypatch):
    from v2l_fast.hypernet import perceiver

    model = perturbed(Frames2LoRA(tiny_config()))
    features = torch.randn(2, 3, 11, 48)
    project = model.aggregator["perceiver"].project
    with torch.no_grad():
        whole, expected = project(features), model.generate(features)
    calls = []
    model.aggregator["perceiver"].modality_projection.register_forward_hook(
        lambda module, args, out: calls.append(args[0].numel() // args[0].shape[-1]))
    monkeypatch.setattr(perceiver, "PROJECTION_CHUNK_ROWS", 16)
    with torch.no_grad():
        assert_rel_close(project(features), whole, tol=1e-6)
        assert calls == [16, 16, 16, 16, 2]  # 66 rows
        adapters = model.generate(features)
    assert_rel_close(adapters.A, expected.A, tol=1e-6)
    assert_rel_close(adapters.B, expected.B, tol=1e-6)
    calls.clear()
    project(features)  # autograd on: one pass, so gradients flow as before
    assert calls == [2 * 3 * 11]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_context_normalized_once_in_place_without_grad(dtype, monkeypatch):
    """The resampler's shared context normalisation: without autograd in place, chunk by chunk,
    equal to one `rms_normalize` pass to the bit; with autograd out of place and differentiable;
    adapters generated either way are identical."""
    from v2l_fast.hypernet import perceiver

    model = perturbed(Frames2LoRA(tiny_config())).to(dtype)
    features = torch.randn(2, 3, 11, 48, dtype=dtype)
    with torch.no_grad():
        inference = model.generate(features)
    training = model.generate(features)
    assert torch.equal(inference.A, training.A.detach()) and torch.equal(inference.B, training.B.detach())

    monkeypatch.setattr(perceiver, "PROJECTION_CHUNK_ROWS", 16)  # (the projection chunks too)
    context = (torch.randn(6, 11, 48) * 3).to(dtype)  # 66 rows: four chunks and a partial one
    expected = perceiver.rms_normalize(context, 1e-6)
    scratch = context.clone()
    with torch.no_grad():
        out = perceiver.normalize_context(scratch, 1e-6)
    assert out.data_ptr() == scratch.data_ptr() and torch.equal(out, expected)
    wide = context.double()
    assert_rel_close(expected.double(), wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6),
                     tol=1e-6 if dtype == torch.float32 else 1e-2)
    leaf = context.clone().requires_grad_(True)
    out = perceiver.normalize_context(leaf, 1e-6)
    assert torch.equal(leaf.detach(), context) and torch.equal(out.detach(), expected)
    assert out.grad_fn is not None


def test_fresh_model_initialisation():
    torch.manual_seed(0)
    cfg = tiny_config(latent_size=64, num_latent_queries=32, intermediate_size=256, rank=8)
    model = Frames2LoRA(cfg)
    L, D, I, H, r = 3, 64, 256, 48, 8
    perceiver = model.aggregator["perceiver"]
    # latents_q: standard normal.
    for q in (perceiver.encoder.latents_q, perceiver.decoder.latents_q):
        assert abs(q.mean().item()) < 0.15 and abs(q.std().item() - 1) < 0.15
    # Head: N(0, (0.5/√(D + d_lora·r))²); bias_A: N(0, (0.2/√(I·r))²).
    head_std = 0.5 / math.sqrt(D + (I + H) * r)
    assert model.head.weight.shape == (L, D, I + H)
    assert abs(model.head.weight.std().item() / head_std - 1) < 0.05
    bias_A = model.bias_A["down_proj"]
    assert bias_A.shape == (L, r, I)
    assert abs(bias_A.std().item() / (0.2 / math.sqrt(I * r)) - 1) < 0.05
    # Scalers and bias_B: A-scaler 1, B-scaler 0, bias_B 0.
    assert torch.equal(model.scaler_A["down_proj"], torch.ones(1, L, r, 1))
    assert torch.equal(model.scaler_B["down_proj"], torch.zeros(1, L, r, 1))
    assert torch.equal(model.bias_B["down_proj"], torch.zeros(L, r, H))
    # Linear layers: PyTorch default U(±1/√fan_in); norms: gain 1, LayerNorm bias 0.
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            bound = 1 / math.sqrt(module.in_features)
            assert module.weight.abs().max() <= bound, name
            assert module.weight.abs().max() > 0.9 * bound, name
        if name.endswith("layernorm") or isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
        if isinstance(module, torch.nn.LayerNorm):
            assert not module.bias.any(), name
    # So a fresh model's delta is exactly zero, while A is not.
    with torch.no_grad():
        out = model.generate(torch.randn(2, L, 5, H))
    assert out.A.shape == (2, L, 2 * r, I) and out.A.abs().sum() > 0
    assert not out.B.any()


@pytest.mark.parametrize("size,expected", [("2.2B", 227_323_136), ("500M", 128_626_176)])
def test_full_size_parameter_count(size, expected):
    cfg = Frames2LoRAConfig.for_vlm(smolvlm_config(size), rank=16)
    with torch.device("meta"):
        model = Frames2LoRA(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.head.weight.shape == (cfg.num_layers, 512, cfg.intermediate_size + cfg.hidden_size)
    assert model.aggregator["perceiver"].modality_projection.gate_proj.weight.shape == \
        (4 * cfg.hidden_size, cfg.hidden_size)
    assert cfg.lora_alpha == 128.0 and cfg.adapter_rank == 32


def test_self_attention_layer_matches_plain_attention():
    cfg = tiny_config(num_self_attn_per_block=1)
    torch.manual_seed(1)
    layer = PerceiverLayer(cfg, cross_attention=False)
    perturbed(layer)
    z = torch.randn(5, cfg.num_latent_queries, cfg.latent_size)
    with torch.no_grad():
        out = layer(z, torch.randn(5, 9, cfg.latent_size), None)  # the context is ignored
        # Independent computation: plain grouped-query self-attention over the latents.
        eps, attn = cfg.rms_norm_eps, layer.self_attn

        def norm(x, w):
            return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

        zn = norm(z, layer.input_latents_layernorm.weight)
        q = attn.q_proj(zn).unflatten(-1, (cfg.num_heads, cfg.head_dim)).transpose(1, 2)
        k = attn.k_proj(zn).unflatten(-1, (cfg.num_kv_heads, cfg.head_dim)).transpose(1, 2)
        v = attn.v_proj(zn).unflatten(-1, (cfg.num_kv_heads, cfg.head_dim)).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        h = z + norm(attn.o_proj(o.transpose(1, 2).flatten(2)), layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        f = norm(h, layer.pre_ff_layernorm.weight)
        f = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(f)) * mlp.up_proj(f))
        expected = h + norm(f, layer.post_ff_layernorm.weight)
    assert_rel_close(out, expected, tol=1e-5)
    model = Frames2LoRA(cfg)
    layers = model.aggregator["perceiver"].encoder.layers
    assert [layer.cross_attention for layer in layers] == [True, False, True, False]
    assert model.generate(torch.randn(1, 3, 4, 48)).A.shape == (1, 3, 8, 80)


def test_autocast_bf16_close_to_fp32():
    model = perturbed(Frames2LoRA(tiny_config()))
    features = torch.randn(2, 3, 6, 48)
    with torch.no_grad():
        exact = model.generate(features, autocast=False)
        mixed = model.generate(features, autocast=True)
    assert mixed.A.dtype == mixed.B.dtype == torch.float32  # head and scalers stay fp32
    assert_rel_close(mixed.A, exact.A, tol=3e-2)
    assert_rel_close(mixed.B, exact.B, tol=3e-2)
    assert not torch.equal(mixed.A, exact.A)  # autocast really changed the Perceiver's math


@pytest.mark.gpu
def test_cuda_default_is_official_bf16_autocast(fixture):
    model = load_frames2lora(OFFICIAL_CKPT, device="cuda")
    features, mask = fixture["in.features"].cuda(), fixture["in.mask"].cuda()
    with torch.no_grad():
        default = model.generate(features.bfloat16(), mask)
        explicit = model.generate(features.bfloat16(), mask, autocast=True)
        exact = model.generate(features, mask, autocast=False)
    assert torch.equal(default.A, explicit.A)
    assert default.A.dtype == torch.float32
    assert_rel_close(default.A, fixture["out.A_combined"].cuda(), tol=3e-2)
    assert_rel_close(exact.A, fixture["out.A_combined"].cuda(), tol=1e-4)


def test_generate_is_differentiable():
    model = perturbed(Frames2LoRA(tiny_config()))
    out = model.generate(torch.randn(1, 3, 4, 48))
    (out.A.square().sum() + out.B.square().sum()).backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    latents_q = model.aggregator["perceiver"].encoder.latents_q
    assert latents_q.grad is not None and latents_q.grad.abs().sum() > 0


@pytest.mark.parametrize("case,argument", [
    (dict(features=torch.randn(2, 3, 5)), "features"),
    (dict(features=torch.randn(2, 4, 5, 48)), "features"),
    (dict(features=torch.randn(2, 3, 5, 40)), "features"),
    (dict(features=torch.zeros(2, 3, 5, 48, dtype=torch.long)), "features"),
    (dict(mask=torch.ones(2, 6)), "mask"),
    (dict(mask=torch.ones(2, 5)), "mask"),  # floating-point
    (dict(mask=torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])), "mask"),
])
def test_generate_bad_inputs(case, argument):
    model = Frames2LoRA(tiny_config())
    args = dict(features=torch.randn(2, 3, 5, 48), mask=torch.ones(2, 5, dtype=torch.long))
    args.update(case)
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        model.generate(args["features"], args["mask"])


def test_combine_lora_weights_and_bias_scaler():
    torch.manual_seed(2)
    N, L, r, I, H = 4, 2, 3, 10, 7
    A, B = torch.randn(N, L, r, I), torch.randn(N, L, r, H)
    bias = (torch.randn(L, r, I), torch.randn(L, r, H))
    scalers, bias_scaler = [0.5, 2.0, -1.0, 3.0], 0.7
    A_c, B_c = combine_lora(A, B, [1, 3], bias=bias, scalers=scalers, bias_scaler=bias_scaler)
    assert A_c.shape == (2, L, 4 * r, I) and B_c.shape == (2, L, 4 * r, H)
    for g, chunks in enumerate(([0], [1, 2, 3])):
        delta = sum(scalers[c] * B[c].mT @ A[c] for c in chunks) + bias_scaler ** 2 * bias[1].mT @ bias[0]
        assert_rel_close(B_c[g].mT @ A_c[g], delta, tol=1e-6)
    # Group 0: chunk rows, then bias rows, then zeros.
    assert torch.equal(A_c[0, :, :r], 0.5 * A[0])
    assert torch.equal(B_c[0, :, r:2 * r], bias_scaler * bias[1])
    assert not A_c[0, :, 2 * r:].any() and not B_c[0, :, 2 * r:].any()
    # Without a bias the r rows after the chunks stay zero; R_max is unchanged.
    A_n, _ = combine_lora(A, B, torch.tensor([2, 2]))
    assert A_n.shape == (2, L, 3 * r, I) and not A_n[:, :, 2 * r:].any()


@pytest.mark.parametrize("kwargs,argument", [
    (dict(n_chunks=[2, 1]), "n_chunks"),
    (dict(n_chunks=[4, 0]), "n_chunks"),
    (dict(n_chunks=[4], scalers=[1.0]), "scalers"),
    (dict(n_chunks=[4], bias=(torch.randn(2, 3, 10),)), "bias"),
    (dict(n_chunks=[4], bias=(torch.randn(2, 3, 10), torch.randn(2, 3, 8))), r"bias\[1\]"),
])
def test_combine_lora_bad_inputs(kwargs, argument):
    A, B = torch.randn(4, 2, 3, 10), torch.randn(4, 2, 3, 7)
    n_chunks = kwargs.pop("n_chunks")
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        combine_lora(A, B, n_chunks, **kwargs)
