"""vLLM's own LoRA loader reads a v2l_fast PEFT export (docs/peft_vllm.md) as the adapter's ΔW.

The steps are those of vLLM's LoRA worker (``vllm/lora/worker_manager.py``, ``_load_adapter``):
``PEFTHelper.from_local_dir``, ``validate_legal`` against the server's ``LoRAConfig``
(``--max-lora-rank``), then ``LoRAModel.from_local_checkpoint`` with the module names vLLM expects
for SmolVLM2 (the LoRA-capable layers of its Llama decoder, packed modules expanded, as the worker
expands them) and SmolVLM2's weight-name mapper. What this cannot show without a GPU: vLLM serving
an answer with the adapter (vLLM's model runner needs CUDA here).

Runs where vLLM is installed; CI has no vLLM (its wheels pin a CUDA build of torch), so there the
tests skip with that reason. Run on 2026-12-08 with vLLM 0.33.0 installed ``--no-deps`` beside
torch 2.13 (CPU), transformers 5.17.0 (vLLM 0.33 requires < 5.21) and its Python-level dependencies.
"""

from __future__ import annotations

import pytest
import torch

from v2l_fast.adapters import Adapters, base_fingerprint
from v2l_fast.adapters.peft import export_folded_base, export_peft
from v2l_fast.reference.compose_adapters import truncate_rank
from v2l_fast.testing import rel_error
from v2l_fast.vlm.factory import random_smolvlm, tiny_vlm

lora_model = pytest.importorskip("vllm.lora.lora_model",
                                 reason="vLLM is not installed (not in CI: its wheels pin a CUDA torch)")
from vllm.config import ModelConfig  # noqa: E402
from vllm.config.lora import LoRAConfig  # noqa: E402
from vllm.lora.peft_helper import PEFTHelper  # noqa: E402
from vllm.model_executor.models.registry import ModelRegistry  # noqa: E402
from vllm.model_executor.models.smolvlm import SmolVLMForConditionalGeneration  # noqa: E402

LAYERS, HIDDEN, INTERMEDIATE = 4, 64, 128  # the tiny SmolVLM2's text decoder
# The LoRA-capable linears of a vLLM Llama decoder layer (vllm/model_executor/models/llama.py).
VLLM_DECODER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def expected_lora_modules() -> set[str]:
    """The module names vLLM's worker accepts for SmolVLM2: packed linears replaced by their parts."""
    packed = SmolVLMForConditionalGeneration.packed_modules_mapping
    return {name for linear in VLLM_DECODER_LINEARS for name in packed.get(linear, [linear])}


def adapters_of_rank(rank: int, seed: int) -> Adapters:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(1, LAYERS, rank, INTERMEDIATE, generator=g) * 0.1
    B = torch.randn(1, LAYERS, rank, HIDDEN, generator=g) * 0.02
    return Adapters(A, B, 2.0 * rank ** 1.5, base_fingerprint(random_smolvlm("tiny", seed=0)), 0)


def vllm_load(directory, max_lora_rank: int):
    """The adapter as a vLLM server started with ``--max-lora-rank max_lora_rank`` loads it."""
    helper = PEFTHelper.from_local_dir(str(directory), max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank, max_loras=1))
    return lora_model.LoRAModel.from_local_checkpoint(
        str(directory), expected_lora_modules(), helper, lora_model_id=1, device="cpu", dtype=torch.float32,
        weights_mapper=getattr(SmolVLMForConditionalGeneration, "hf_to_vllm_mapper", None))


@pytest.fixture(autouse=True)
def _no_pinned_memory(monkeypatch):
    """vLLM stages a loaded LoRA in pinned host memory, which needs a GPU; without one its CUDA build
    still believes it can pin. Pinning changes where the tensors live, not what is loaded."""
    monkeypatch.setattr(lora_model, "PIN_MEMORY", False)


@pytest.mark.parametrize("rank, max_rank, served_rank", [(8, None, 8), (6, None, 8), (24, 16, 16)],
                         ids=["rank-8", "rank-6-padded-to-8", "rank-24-recompressed-to-16"])
def test_vllm_loads_the_export_onto_each_down_proj_with_the_adapters_delta(rank, max_rank, served_rank, tmp_path):
    adapters = adapters_of_rank(rank, seed=rank)
    out = export_peft(adapters, tmp_path / "video", max_rank=max_rank)
    lora = vllm_load(out, served_rank)
    language_model = SmolVLMForConditionalGeneration.get_mm_mapping(None).language_model[0]  # "model.text_model"
    names = [f"{language_model}.layers.{layer}.mlp.down_proj" for layer in range(LAYERS)]
    assert sorted(lora.loras) == sorted(names)
    A, B = adapters.A[0].double(), adapters.B[0].double()  # [L, r, I], [L, r, H]
    tol = 1e-6  # the export's one fp32 rounding (α into lora_B)
    if max_rank is not None:
        A, B = truncate_rank(A, B, max_rank)  # the best rank-max_rank approximation, in fp64 here
        tol = 1e-5  # the export re-compresses in fp32
    for layer, name in enumerate(names):
        weights = lora.loras[name]
        assert weights.rank == served_rank and weights.input_dim == INTERMEDIATE and weights.output_dim == HIDDEN
        delta = weights.scaling * weights.lora_b.double() @ weights.lora_a.double()  # vLLM's [H, I] update
        assert rel_error(delta, adapters.alpha * B[layer].mT @ A[layer]) < tol


def test_vllm_refuses_the_export_below_its_rank(tmp_path):
    out = export_peft(adapters_of_rank(24, seed=1), tmp_path / "video")  # padded to 32
    with pytest.raises(ValueError, match="LoRA rank 32 is greater than max_lora_rank 16"):
        vllm_load(out, 16)


def test_vllm_reads_the_folded_base_as_its_smolvlm2_model(tmp_path):
    """The bias-folded base that folded adapters are served on: vLLM's model config reads the
    directory and resolves the SmolVLM2 class that takes the LoRAs above."""
    g = torch.Generator().manual_seed(3)
    bias_A, bias_B = torch.randn(LAYERS, 4, INTERMEDIATE, generator=g), torch.randn(LAYERS, 4, HIDDEN, generator=g)
    base_dir = tmp_path / "folded_base"
    export_folded_base(tiny_vlm(seed=0), bias_A * 0.1, bias_B * 0.01, 16.0, base_dir)
    config = ModelConfig(model=str(base_dir))
    assert config.hf_config.text_config.num_hidden_layers == LAYERS and config.is_multimodal_model
    model_cls, architecture = ModelRegistry.resolve_model_cls(config.architectures, model_config=config)
    assert model_cls is SmolVLMForConditionalGeneration and architecture == "SmolVLMForConditionalGeneration"
