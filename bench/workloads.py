"""Workloads shared by the benchmark modules: the hypernetwork's shapes, context lengths, FLOP counts.

The Perceiver at the released checkpoints' sizes (docs/method.md §11):
D = 512 latents width, Q = 8 latent queries, 16 heads of 128 (4 kv heads), 9 encoder blocks;
the text widths and tokens per frame of SmolVLM2-500M and -2.2B.
"""

from __future__ import annotations

MODELS = {"500M": dict(L=32, H=960, tokens_per_frame=64), "2.2B": dict(L=24, H=2048, tokens_per_frame=81)}
FRAMES = (12, 64, 256, 1024)
PROMPT_TOKENS = 64  # chat template, frame captions and the internalisation prompt, roughly
D, Q, NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, NUM_BLOCKS = 512, 8, 16, 128, 4, 9


def context_length(model: str, frames: int) -> int:
    """Context tokens S of one video: frames × tokens per frame + the prompt."""
    return frames * MODELS[model]["tokens_per_frame"] + PROMPT_TOKENS


def block_flops(rows: int, S: int, absorbed: bool) -> int:
    """Forward FLOPs of the 9 blocks' attention over the context (the latent-only terms are <1%)."""
    R = NUM_HEADS * Q
    per_token = 4 * R * D if absorbed else 4 * NUM_KV_HEADS * HEAD_DIM * D + 4 * R * HEAD_DIM
    return NUM_BLOCKS * rows * S * per_token


def projection_flops(rows: int, H: int) -> int:
    """Forward FLOPs of the modality projection (SwiGLU H → 4H → D, gate and up) over ``rows``."""
    return rows * (2 * H * 8 * H + 2 * 4 * H * D)
