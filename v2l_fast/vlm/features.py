"""Feature extraction for the hypernetwork (docs/method.md §2, "Forward").

One forward of the inner SmolVLM model (no LM head) on video + instruction with
``output_hidden_states=True`` and ``use_cache=False`` under ``no_grad``. Hidden state i < L is
the residual stream entering decoder layer i (entry 0: token embeddings, with the connector
outputs at ``<image>`` positions); the last entry (the final norm's output) is dropped. All
positions are kept; the attention mask is the hypernetwork's context mask.
"""

from __future__ import annotations

import torch

from v2l_fast.errors import check_tensor, fail
from v2l_fast.vlm.frames import VideoBatch


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The SmolVLM model without its LM head (``model.model`` of the generation class)."""
    return model.model if hasattr(model, "lm_head") else model


@torch.no_grad()
def extract_features(model: torch.nn.Module, batch: VideoBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked layer states ``[B, L, S, H]`` (model dtype) and the mask ``[B, S]`` of ``batch``.

    ``model`` is a SmolVLMForConditionalGeneration or its inner model; ``batch`` is moved to
    the model's device and its pixels cast to the model's dtype.
    """
    check_tensor("input_ids", batch.input_ids, ndim=2, index=True, shape_hint="[B, S]")
    if batch.attention_mask.shape != batch.input_ids.shape:
        fail("attention_mask", f"shape {list(batch.input_ids.shape)} (that of input_ids)",
             list(batch.attention_mask.shape))
    vlm = inner_model(model)
    param = next(vlm.parameters())
    batch = batch.to(param.device, param.dtype)
    out = vlm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              pixel_values=batch.pixel_values, pixel_attention_mask=batch.pixel_attention_mask,
              output_hidden_states=True, use_cache=False, return_dict=True)
    states = out.hidden_states[:-1]
    return torch.stack(states, dim=1), batch.attention_mask


def image_tokens(model: torch.nn.Module, pixel_values: torch.Tensor,
                 pixel_attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Each video's ``<image>`` tokens as the decoder sees them: the connector's output
    ``[F_i · tokens_per_frame, H]`` for video i of ``pixel_values [B, F, 3, S, S]`` (padding frames
    dropped), on the model's device and in its dtype; differentiable when the tower learns."""
    inner = inner_model(model)
    param = next(inner.parameters())
    pixels = pixel_values.to(param.device, param.dtype)
    tokens = inner.get_image_features(pixels, pixel_attention_mask.to(param.device), return_dict=True).pooler_output
    if isinstance(tokens, torch.Tensor):  # transformers < 5.21: one [real frames, tokens_per_frame, H] tensor
        tokens = [frames.flatten(0, 1) for frames in tokens.split(real_frames(pixels).tolist())]
    return list(tokens)


def real_frames(pixel_values: torch.Tensor) -> torch.Tensor:
    """Frames of each video in ``pixel_values [B, F, 3, S, S]`` that the vision tower reads, ``[B]``
    int64: SmolVLM's own rule — a frame of zeros is padding, except the batch's first frame when
    every frame is."""
    counts = pixel_values.flatten(2).ne(0).any(dim=2).sum(dim=1)
    if not counts.any():
        counts[0] = 1
    return counts


def video_rows_embeds(model: torch.nn.Module, input_ids: torch.Tensor, video_tokens: list[torch.Tensor],
                      row_video: torch.Tensor | list[int]) -> torch.Tensor:
    """The decoder's input embeddings ``[rows, T, H]`` of rows whose ``<image>`` positions take the
    tokens of video ``row_video[i]`` (``video_tokens``: per video, `image_tokens`), so that a video's
    tokens are made once and shared by its rows — what the model's own forward makes from pixels
    repeated per row. Refuses rows whose ``<image>`` positions do not match their videos' token
    counts."""
    inner = inner_model(model)
    row_video = row_video.tolist() if isinstance(row_video, torch.Tensor) else row_video
    tokens = torch.cat([video_tokens[v] for v in row_video])
    embeds = inner.get_input_embeddings()(input_ids)
    slots = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    if int(slots[..., 0].sum()) != tokens.shape[0]:
        fail("input_ids", f"{tokens.shape[0]} <image> tokens (those of the rows' videos)", int(slots[..., 0].sum()))
    return embeds.masked_scatter(slots, tokens.to(embeds.dtype))


def video_rows_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      video_tokens: list[torch.Tensor], row_video: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states ``[rows, T, H]`` on the rows of `video_rows_embeds`."""
    embeds = video_rows_embeds(model, input_ids, video_tokens, row_video)
    return inner_model(model).text_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                         use_cache=False).last_hidden_state
