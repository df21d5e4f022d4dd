"""Feature extraction: the fixture's official features, shapes, batching over frame counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden import FIXTURES, needs_fixtures
from safetensors.torch import load_file

from v2l_fast.testing import assert_rel_close
from v2l_fast.vlm import Video, VideoBatch, build_video_batch, extract_features, load_smolvlm
from v2l_fast.vlm.factory import tiny_smolvlm_tokenizer, tiny_vlm
from v2l_fast.vlm.features import image_tokens, inner_model, real_frames, video_rows_embeds, video_rows_hidden


@needs_fixtures
def test_features_match_the_official_extraction():
    fx = load_file(FIXTURES / "frames2lora_tiny.safetensors")
    vlm = load_smolvlm(FIXTURES / "frames2lora_tiny_vlm", dtype=torch.float32, tokenizer=tiny_smolvlm_tokenizer())
    ids = fx["e2e.ctx_input_ids"]
    batch = VideoBatch(ids, torch.ones_like(ids), fx["e2e.pixel_values"], fx["e2e.pixel_attention_mask"])
    features, mask = extract_features(vlm.model, batch)
    assert features.shape == (1, 4, 21, 64)
    assert_rel_close(features, fx["e2e.features"], tol=1e-5)
    assert torch.equal(mask, fx["e2e.mask"])


def test_features_are_the_states_entering_each_decoder_layer():
    vlm = tiny_vlm(seed=1, longest_edge=64)
    video = Video.from_frames(np.random.default_rng(0).integers(0, 256, (2, 24, 40, 3), dtype=np.uint8))
    batch = build_video_batch([video], "Remember.", vlm.tokenizer, vlm.preprocessor)
    features, mask = extract_features(vlm.model, batch)
    layers = vlm.model.model.text_model.layers
    entering = []
    hooks = [layer.register_forward_pre_hook(lambda m, args, kw: entering.append(args[0] if args
                                                                                  else kw["hidden_states"]),
                                             with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            vlm.model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            pixel_values=batch.pixel_values, pixel_attention_mask=batch.pixel_attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert features.shape == (1, len(layers), batch.input_ids.shape[1], 64)
    torch.testing.assert_close(features[0], torch.cat(entering), rtol=0, atol=0)
    assert torch.equal(mask, batch.attention_mask)


def test_batch_of_different_frame_counts_equals_one_by_one():
    vlm = tiny_vlm(seed=2, longest_edge=64)
    rng = np.random.default_rng(1)
    videos = [Video.from_frames(rng.integers(0, 256, (n, 20, 28, 3), dtype=np.uint8), fps=1) for n in (3, 1, 2)]
    batch = build_video_batch(videos, "Remember.", vlm.tokenizer, vlm.preprocessor)
    features, mask = extract_features(vlm.model, batch)
    for b, video in enumerate(videos):
        alone, alone_mask = extract_features(vlm.model, build_video_batch([video], "Remember.", vlm.tokenizer,
                                                                           vlm.preprocessor))
        n = alone.shape[2]
        assert int(mask[b].sum()) == n and not mask[b, n:].any()
        assert_rel_close(features[b:b + 1, :, :n], alone, tol=1e-5)


def test_extract_features_rejects_mismatched_mask():
    vlm = tiny_vlm()
    ids = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        extract_features(vlm.model, VideoBatch(ids, torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 1, 3, 32, 32),
                                               torch.ones(1, 1, 32, 32, dtype=torch.bool)))


def test_rows_sharing_their_videos_tokens_equal_the_model_run_on_each_row_with_its_video():
    vlm = tiny_vlm(seed=3, longest_edge=64)
    rng = np.random.default_rng(2)
    videos = [Video.from_frames(rng.integers(0, 256, (n, 20, 28, 3), dtype=np.uint8), fps=1) for n in (2, 1)]
    batch = build_video_batch(videos, "Remember.", vlm.tokenizer, vlm.preprocessor)
    tokens = image_tokens(vlm.model, batch.pixel_values, batch.pixel_attention_mask)
    per_frame = vlm.preprocessor.image_seq_len
    assert [t.shape[0] for t in tokens] == [2 * per_frame, per_frame]
    row_video = torch.tensor([1, 0, 1])  # three rows, video 1 twice
    ids, mask = batch.input_ids[row_video], batch.attention_mask[row_video]
    with torch.no_grad():
        hidden = video_rows_hidden(vlm.model, ids, mask, tokens, row_video)
        expected = vlm.model.model(input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values[row_video],
                                   pixel_attention_mask=batch.pixel_attention_mask[row_video]).last_hidden_state
    real = mask.bool()
    assert_rel_close(hidden[real], expected[real], tol=1e-5)
    # the embeddings generate gets (a list of video ids works too): the video's tokens at its
    # <image> positions, the text's own embeddings elsewhere
    embeds = video_rows_embeds(vlm.model, ids, tokens, row_video.tolist())
    slots = ids == vlm.model.config.image_token_id
    assert torch.equal(embeds[slots], torch.cat([tokens[v] for v in row_video.tolist()]))
    assert torch.equal(embeds[~slots], inner_model(vlm.model).get_input_embeddings()(ids)[~slots])
    # the videos' tokens swapped: the row of the one-frame video gets the two-frame video's tokens
    with pytest.raises(ValueError, match=rf"^input_ids: expected {2 * per_frame} <image> tokens \(those of the "
                                         rf"rows' videos\), got {per_frame}$"):
        video_rows_hidden(vlm.model, ids[:1], mask[:1], tokens[::-1], row_video[:1])


def test_real_frames_follow_smolvlms_padding_rule():
    pixels = torch.randn(3, 4, 3, 8, 8)
    pixels[0, 2:] = 0  # video 0: two frames, then padding
    pixels[1, 1:] = 0  # video 1: one frame
    pixels[2, 3, 0, 0, 0] = 0  # one zero value does not make a frame padding
    assert real_frames(pixels).tolist() == [2, 1, 4]
    # a batch of padding only: SmolVLM keeps the first frame, so one frame reaches the tower
    assert real_frames(torch.zeros(2, 3, 3, 8, 8)).tolist() == [1, 0]


def test_image_tokens_split_the_older_transformers_output_per_video(monkeypatch):
    """transformers < 5.21 returns the connector's output as one ``[real frames, tokens, H]``
    tensor over the batch; `image_tokens` splits it per video, as the newer per-video list."""
    vlm = tiny_vlm(seed=4, longest_edge=64)
    rng = np.random.default_rng(3)
    videos = [Video.from_frames(rng.integers(0, 256, (n, 20, 28, 3), dtype=np.uint8), fps=1) for n in (1, 3, 2)]
    batch = build_video_batch(videos, "Remember.", vlm.tokenizer, vlm.preprocessor)
    with torch.no_grad():
        per_video = image_tokens(vlm.model, batch.pixel_values, batch.pixel_attention_mask)
        inner = inner_model(vlm.model)
        newer = type(inner).get_image_features

        def older(self, *args, **kwargs):
            out = newer(self, *args, **kwargs)
            if not isinstance(out.pooler_output, torch.Tensor):  # (on transformers < 5.21 it already is)
                out.pooler_output = torch.cat(out.pooler_output).unflatten(0, (-1, vlm.preprocessor.image_seq_len))
            return out

        monkeypatch.setattr(type(inner), "get_image_features", older)
        split = image_tokens(vlm.model, batch.pixel_values, batch.pixel_attention_mask)
    assert [t.shape[0] for t in per_video] == [n * vlm.preprocessor.image_seq_len for n in (1, 3, 2)]
    assert len(split) == 3 and all(torch.equal(a, b) for a, b in zip(split, per_video))
