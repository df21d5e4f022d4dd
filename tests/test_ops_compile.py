"""torch.compile sees the ops as single `torch.ops.v2l_fast` nodes, and compiled results equal eager ones.

Graph-level tests trace with dynamo (``fullgraph=True``: a graph break fails the test) and run
the captured graph eagerly, counting the op nodes; gradient tests go through AOTAutograd
(``aot_eager``), which traces the ops' registered backward; one test runs the real compiler
(inductor) on a patched decoder, the slowest and most faithful check.
"""

from __future__ import annotations

import pytest
import torch

from v2l_fast import ops
from v2l_fast.testing import assert_rel_close
from v2l_fast.vlm import LoRAPatch, down_proj_targets
from v2l_fast.vlm.factory import random_smolvlm

CPU_BACKENDS = [b for b in ("torch", "cpp") if b in ops.available_backends("lora_sgmv")]


def capture(graphs: list):
    """A dynamo backend that records each FX graph and runs it as is."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def count(graphs, op) -> int:
    return sum(node.target in (op, op.default) for gm in graphs for node in gm.graph.nodes)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def patched_decoder(backend, *, rows=3, rank=8, seed=0, requires_grad=False):
    """The tiny SmolVLM2 text decoder with a LoRAPatch on every down_proj (one adapter per row)."""
    model = random_smolvlm("tiny", seed=seed)
    cfg = model.config.text_config
    gen = torch.Generator().manual_seed(seed)
    L, I, O = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
    A = (torch.randn(rows, L, rank, I, generator=gen) * 0.1).requires_grad_(requires_grad)
    B = (torch.randn(rows, L, rank, O, generator=gen) * 0.1).requires_grad_(requires_grad)
    patch = LoRAPatch(down_proj_targets(model), A, B, 2.0, backend=backend)
    ids = torch.randint(3, cfg.vocab_size - 20, (rows, 7), generator=gen)
    return model.model.text_model, patch, ids, A, B


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_patched_decoder_compiles_to_one_graph_with_one_lora_node_per_layer(backend):
    decoder, patch, ids, _, _ = patched_decoder(backend)
    graphs = []
    with patch, torch.no_grad():
        eager = decoder(input_ids=ids).last_hidden_state
        compiled = torch.compile(decoder, backend=capture(graphs), fullgraph=True)(input_ids=ids).last_hidden_state
    assert len(graphs) == 1
    assert count(graphs, torch.ops.v2l_fast.lora_sgmv) == len(down_proj_targets(decoder))
    assert_rel_close(compiled, eager, torch.float32)


def test_compiled_graph_keeps_the_backend_chosen_while_tracing():
    decoder, patch, ids, _, _ = patched_decoder("torch")
    graphs = []
    with patch, torch.no_grad():
        torch.compile(decoder, backend=capture(graphs), fullgraph=True)(input_ids=ids)
    backends = {node.args[-1] for gm in graphs for node in gm.graph.nodes
                if node.target in (torch.ops.v2l_fast.lora_sgmv, torch.ops.v2l_fast.lora_sgmv.default)}
    assert backends == {"torch"}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_training_step_gradients_match_eager(backend):
    """AOTAutograd traces the op's backward; dA, dB and the loss equal eager autograd's."""
    decoder, patch, ids, A, B = patched_decoder(backend, requires_grad=True)

    def loss_fn(input_ids):
        return decoder(input_ids=input_ids).last_hidden_state.square().mean()

    with patch:
        eager_loss = loss_fn(ids)
        eager_grads = torch.autograd.grad(eager_loss, (A, B))
        compiled_loss = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(ids)
        compiled_grads = torch.autograd.grad(compiled_loss, (A, B))
    assert_rel_close(compiled_loss, eager_loss, torch.float32)
    for got, want in zip(compiled_grads, eager_grads):
        assert want.abs().sum() > 0
        assert_rel_close(got, want, torch.float32)


def perceiver_inputs(seed=0, N=4, Q=3, S=9, D=16, nh=4, nkv=2, hd=4):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    weights = dict(q_weight=rand(nh * hd, D), k_weight=rand(nkv * hd, D), v_weight=rand(nkv * hd, D),
                   o_weight=rand(D, nh * hd), latents_norm_weight=rand(D), context_norm_weight=rand(D))
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[1, 5:] = False
    return rand(N, Q, D), rand(N, S, D), mask, weights, dict(num_heads=nh, num_kv_heads=nkv)


def test_perceiver_attention_and_swiglu_mlp_compile_as_single_nodes_with_gradients():
    latents, context, mask, weights, heads = perceiver_inputs()
    gen = torch.Generator().manual_seed(1)
    gate, up, down = (torch.randn(*s, generator=gen).requires_grad_() for s in ((32, 16), (32, 16), (16, 32)))

    def block(latents, context):
        attended = ops.perceiver_attention(latents, context, mask, **weights, **heads, check=False)
        return ops.swiglu_mlp(latents + attended, gate, up, down).square().sum()

    leaves = (latents, context, *weights.values(), gate, up, down)
    eager = block(latents, context)
    eager_grads = torch.autograd.grad(eager, leaves)
    graphs = []
    torch.compile(block, backend=capture(graphs), fullgraph=True)(latents, context)
    assert count(graphs, torch.ops.v2l_fast.perceiver_attention) == 1
    assert count(graphs, torch.ops.v2l_fast.swiglu_mlp) == 1
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(latents, context)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    assert_rel_close(compiled, eager, torch.float32)
    for got, want in zip(compiled_grads, eager_grads):
        assert_rel_close(got, want, torch.float32)


@pytest.mark.slow
def test_patched_decoder_under_inductor_matches_eager(monkeypatch):
    # Inductor's C++ build imports setuptools, whose distutils shim refuses to run once another
    # test has imported the standard library's distutils; keep the standard one.
    monkeypatch.setenv("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    decoder, patch, ids, _, _ = patched_decoder(CPU_BACKENDS[-1])
    with patch, torch.no_grad():
        eager = decoder(input_ids=ids).last_hidden_state
        compiled = torch.compile(decoder, fullgraph=True)(input_ids=ids).last_hidden_state
    assert_rel_close(compiled, eager, torch.float32)
