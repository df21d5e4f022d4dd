"""Tiny and full-size SmolVLM2 models built in-process, for the demo, the benchmarks and the tests.

No weights are downloaded: `smolvlm_config` builds a `SmolVLMConfig` either tiny (seconds on a
CPU) or with the shapes of the released 256M / 500M / 2.2B models (`SMOLVLM2_SHAPES`; random
weights, for timing). `random_smolvlm` instantiates one, `tiny_smolvlm_tokenizer` is a
character-level tokenizer with SmolVLM2's special tokens, and `tiny_vlm` puts a tiny model and
that tokenizer together into a `VLM`.
"""

from __future__ import annotations

import torch

from v2l_fast.errors import fail
from v2l_fast.vlm.frames import VideoPreprocessor
from v2l_fast.vlm.load import VLM

# Text (Llama/SmolLM2) and vision (SigLIP) shapes of the released SmolVLM2 checkpoints.
SMOLVLM2_SHAPES: dict[str, dict] = {
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=160, max_position_embeddings=512),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    image_size=32, patch_size=8),
        scale_factor=2, image_token_id=150),
    "256M": dict(
        text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, vocab_size=49280, max_position_embeddings=8192),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16),
        scale_factor=4, image_token_id=49190),
    "500M": dict(
        text=dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                  num_key_value_heads=5, head_dim=64, vocab_size=49280, max_position_embeddings=8192),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16),
        scale_factor=4, image_token_id=49190),
    "2.2B": dict(
        text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=32, head_dim=64, vocab_size=49280, max_position_embeddings=8192),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14),
        scale_factor=3, image_token_id=49190),
}


def smolvlm_config(size: str = "tiny", **text_overrides):
    """A `SmolVLMConfig` with the shapes of ``size`` ("tiny", "256M", "500M" or "2.2B").

    ``text_overrides`` replace text-config fields, e.g. ``num_hidden_layers=2``.
    """
    from transformers import SmolVLMConfig

    if size not in SMOLVLM2_SHAPES:
        fail("size", f"one of {sorted(SMOLVLM2_SHAPES)}", repr(size))
    shape = SMOLVLM2_SHAPES[size]
    text = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape["text"])
    text.update(text_overrides)
    return SmolVLMConfig(
        text_config=text,
        vision_config=dict(model_type="smolvlm_vision", **shape["vision"]),
        scale_factor=shape["scale_factor"],
        image_token_id=shape["image_token_id"],
        tie_word_embeddings=False,
    )


def random_smolvlm(size: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", **text_overrides):
    """A `SmolVLMForConditionalGeneration` with random weights and ``size``'s shapes, in eval mode."""
    from transformers import SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(smolvlm_config(size, **text_overrides))
    return model.to(device=device, dtype=dtype).eval()


def image_seq_len(size: str) -> int:
    """Visual tokens per frame of a ``size`` model: (image/patch)² / scale_factor²."""
    shape = SMOLVLM2_SHAPES[size]
    side = shape["vision"]["image_size"] // shape["vision"]["patch_size"]
    return side * side // shape["scale_factor"] ** 2


# Special tokens of SmolVLM2's tokenizer that the video prompt and the chat template use.
TINY_SPECIAL_TOKENS = {0: "<pad>", 1: "<|im_start|>", 2: "<end_of_utterance>",
                       3: "<fake_token_around_image>", 4: "<global-img>", 5: "<unk>", 150: "<image>"}


def tiny_smolvlm_tokenizer(vocab_size: int = 160):
    """A character-level tokenizer for tiny SmolVLM2 models, built in-process.

    Ids 0–5 and 150 are SmolVLM2's special tokens (`TINY_SPECIAL_TOKENS`: pad 0, bos
    ``<|im_start|>`` 1, eos ``<end_of_utterance>`` 2, ``<image>`` 150 = the tiny config's
    image_token_id); then newline and printable ASCII one id each; the rest are unused
    placeholders. The chat template is SmolVLM2's (transformers' SmolVLM template), so a
    question renders ``<|im_start|>User: {text}<end_of_utterance>\\nAssistant:``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = dict((token, i) for i, token in TINY_SPECIAL_TOKENS.items())
    next_id = iter(i for i in range(vocab_size) if i not in TINY_SPECIAL_TOKENS)
    for char in chars:
        vocab[char] = next(next_id)
    for i in next_id:
        vocab[f"<unused_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in TINY_SPECIAL_TOKENS.values()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<pad>", unk_token="<unk>", chat_template=DEFAULT_CHAT_TEMPLATE)


def tiny_vlm(seed: int = 0, *, model=None, **preprocessor_overrides):
    """A `v2l_fast.vlm.VLM` of a tiny random SmolVLM2 (or ``model``) and `tiny_smolvlm_tokenizer`.

    ``preprocessor_overrides`` replace `VideoPreprocessor` fields (e.g. ``max_frames=3``).
    """
    model = model if model is not None else random_smolvlm("tiny", seed=seed)
    tokenizer = tiny_smolvlm_tokenizer(model.config.text_config.vocab_size)
    return VLM(model, tokenizer, VideoPreprocessor.for_model(model.config, **preprocessor_overrides))
