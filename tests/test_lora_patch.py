"""The LoRA patch: fixture down_proj outputs, generate on SmolVLM2 and Llama, removal, threads."""

from __future__ import annotations

import threading

import pytest
import torch
from golden import FIXTURES, needs_fixtures
from safetensors.torch import load_file

from v2l_fast.testing import assert_rel_close
from v2l_fast.vlm import LoRAPatch, decoder_layers, down_proj_targets, is_patched
from v2l_fast.vlm.factory import random_smolvlm


def tiny_llama(seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def random_adapters(n, L, R, I, O, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, R, I, generator=g) * scale, torch.randn(n, L, R, O, generator=g) * scale


@needs_fixtures
def test_fixture_down_proj_outputs():
    fx = load_file(FIXTURES / "frames2lora_tiny.safetensors")
    W, x = fx["lora.down_proj_weight"], fx["lora.x"]
    L, H, I = W.shape
    modules = [torch.nn.Linear(I, H, bias=False) for _ in range(L)]
    with torch.no_grad():
        for module, weight in zip(modules, W):
            module.weight.copy_(weight)
    with LoRAPatch(modules, fx["out.A_combined"], fx["out.B_combined"], 16.0):
        for layer, module in enumerate(modules):
            assert_rel_close(module(x), fx["lora.out"][layer], tol=1e-6)
    for layer, module in enumerate(modules):
        assert_rel_close(module(x), fx["lora.base_out"][layer], tol=1e-6)


def merged_logits(model, targets, A, B, scaling, input_ids):
    """Logits of a batch-of-1 run with ΔW = scaling·BᵀA merged into each target's weight."""
    saved = [t.weight.detach().clone() for t in targets]
    try:
        with torch.no_grad():
            for layer, module in enumerate(targets):
                module.weight += scaling * (B[0, layer].T @ A[0, layer])
            return model(input_ids=input_ids).logits
    finally:
        with torch.no_grad():
            for module, weight in zip(targets, saved):
                module.weight.copy_(weight)


@pytest.mark.parametrize("make_model", ["smolvlm", "llama"])
def test_patch_equals_merged_weights_and_is_removed(make_model):
    model = random_smolvlm("tiny", seed=4) if make_model == "smolvlm" else tiny_llama()
    targets = down_proj_targets(model)
    L, I, H = len(targets), targets[0].in_features, targets[0].out_features
    A, B = random_adapters(1, L, 6, I, H, seed=1)
    ids = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        expected = merged_logits(model, targets, A, B, 3.0, ids)
        with LoRAPatch(targets, A, B, 3.0) as patch:
            assert is_patched(model) and patch.active
            patched = model(input_ids=ids).logits
        assert not is_patched(model) and not patch.active
        after = model(input_ids=ids).logits
    assert_rel_close(patched, expected, tol=1e-5)
    assert torch.equal(after, base)
    assert (patched - base).norm() > 1e-3 * base.norm()  # the adapter really changes the output


def test_zero_adapter_leaves_logits_unchanged():
    model = random_smolvlm("tiny", seed=5)
    targets = down_proj_targets(model)
    ids = torch.randint(3, 150, (2, 6))
    A, B = random_adapters(2, len(targets), 4, 128, 64)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with LoRAPatch(targets, A, torch.zeros_like(B), 16.0):
            assert torch.equal(model(input_ids=ids).logits, base)


def test_generate_uses_adapter_b_for_row_b_at_every_step():
    model = tiny_llama(seed=1)
    targets = down_proj_targets(model)
    A, B = random_adapters(3, len(targets), 4, 80, 48, seed=2, scale=0.3)
    ids = torch.randint(3, 97, (3, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), LoRAPatch(targets, A, B, 2.0):
        batched = model.generate(input_ids=ids, **kwargs)
    for b in range(3):
        with torch.no_grad(), LoRAPatch(targets, A[b:b + 1], B[b:b + 1], 2.0):
            alone = model.generate(input_ids=ids[b:b + 1], **kwargs)
            # the decode steps see the adapter too: a teacher-forced pass over the whole
            # generated sequence gives back the same greedy tokens
            logits = model(input_ids=alone).logits
        assert torch.equal(batched[b], alone[0])
        assert torch.equal(logits[0, 4:-1].argmax(-1), alone[0, 5:])
    with torch.no_grad():
        plain = model.generate(input_ids=ids, **kwargs)
    assert not torch.equal(plain, batched)


def test_row_adapters_and_generic_layer_mapping():
    model = tiny_llama(seed=2, layers=2)
    targets = down_proj_targets(model)
    A, B = random_adapters(2, 4, 4, 80, 48, seed=3, scale=0.3)  # a 4-layer pool, layers 3 and 1 used
    ids = torch.randint(3, 97, (3, 5))
    rows = torch.tensor([1, -1, 0])
    with torch.no_grad():
        with LoRAPatch(targets, A, B, 2.0, layers=[3, 1], row_adapters=rows):
            out = model(input_ids=ids).logits
        base = model(input_ids=ids).logits
        pool = (A[:, [3, 1]], B[:, [3, 1]])
        for b, adapter in enumerate(rows.tolist()):
            if adapter < 0:
                assert torch.equal(out[b], base[b])
                continue
            with LoRAPatch(targets, pool[0][adapter:adapter + 1], pool[1][adapter:adapter + 1], 2.0):
                assert_rel_close(out[b], model(input_ids=ids[b:b + 1]).logits[0], tol=1e-5)


def test_two_threads_patch_two_models_without_interference():
    models = [tiny_llama(seed=s) for s in (3, 4)]
    adapters = [random_adapters(2, 3, 4, 80, 48, seed=s, scale=0.3) for s in (5, 6)]
    ids = torch.randint(3, 97, (2, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(i):
        with torch.no_grad(), LoRAPatch(down_proj_targets(models[i]), *adapters[i], 2.0):
            return model_outputs.__setitem__(i, [models[i].generate(input_ids=ids, **kwargs) for _ in range(3)])

    expected = []
    for i in range(2):
        with torch.no_grad(), LoRAPatch(down_proj_targets(models[i]), *adapters[i], 2.0):
            expected.append(models[i].generate(input_ids=ids, **kwargs))
    model_outputs = [None, None]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert all(torch.equal(out, expected[i]) for out in model_outputs[i])
        assert not is_patched(models[i])


def test_bad_arguments_are_refused():
    model = tiny_llama()
    targets = down_proj_targets(model)
    A, B = random_adapters(2, 3, 4, 80, 48)
    with pytest.raises(ValueError, match="targets"):
        LoRAPatch([], A, B, 1.0)
    with pytest.raises(ValueError, match=r"targets\[0\].*Linear"):
        LoRAPatch([model.model.norm], A, B, 1.0)
    with pytest.raises(ValueError, match="A: .*in_features"):
        LoRAPatch(targets, A[..., :79], B, 1.0)
    with pytest.raises(ValueError, match="B: .*out_features"):
        LoRAPatch(targets, A, B[..., :47], 1.0)
    with pytest.raises(ValueError, match="layers"):
        LoRAPatch(targets, A, B, 1.0, layers=[0, 1])
    with pytest.raises(ValueError, match=r"layers\[2\]"):
        LoRAPatch(targets, A, B, 1.0, layers=[0, 1, 3])
    with pytest.raises(ValueError, match="seg_adapter"):
        LoRAPatch(targets, A, B, 1.0, row_adapters=torch.tensor([0, 2]))
    with LoRAPatch(targets, A, B, 1.0):
        with pytest.raises(ValueError, match="already patched"):
            LoRAPatch(targets, A, B, 1.0)
        with pytest.raises(ValueError, match="2 batch rows"), torch.no_grad():
            model(input_ids=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="model"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_reach_the_adapters_as_with_merged_weights(backend):
    """Training path: d(loss)/dA, dB through the patch equal those of ΔW merged functionally."""
    model = tiny_llama(seed=5, layers=2)
    targets = down_proj_targets(model)
    L, I, H = len(targets), targets[0].in_features, targets[0].out_features
    A0, B0 = random_adapters(2, L, 4, I, H, seed=6, scale=0.1)
    ids = torch.randint(3, 97, (2, 5))

    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    with LoRAPatch(targets, A, B, 2.0, backend=backend):
        model(input_ids=ids).logits.square().mean().backward()

    names = [name for name, module in model.named_modules() if module in targets]
    A_ref, B_ref = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    losses = []
    for row in range(2):  # one merged model per batch row (row b uses adapter b)
        params = {f"{name}.weight": t.weight + 2.0 * B_ref[row, layer].T @ A_ref[row, layer]
                  for layer, (name, t) in enumerate(zip(names, targets))}
        logits = torch.func.functional_call(model, params, (ids[row:row + 1],)).logits
        losses.append(logits.square().sum())
    (sum(losses) / (2 * ids.shape[1] * logits.shape[-1])).backward()
    assert_rel_close(A.grad, A_ref.grad, tol=1e-4)
    assert_rel_close(B.grad, B_ref.grad, tol=1e-4)
