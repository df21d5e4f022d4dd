"""Once-per-batch segment metadata for the LoRA SGMV kernels (torch only, no triton import).

Tokens are regrouped by adapter (a stable sort of the per-token adapter id, tokens without an
adapter last) and cut into tiles of at most ``block_m`` tokens of one adapter: the work list
that the shrink, expand and gradient kernels walk. Everything is built with fixed-size device
ops (``repeat_interleave`` with ``output_size``, ``argsort``, ``index_add_``, ``cumsum``,
``searchsorted``), so building it never synchronises with the GPU, and every decoder layer of
a batch reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraSgmvMetadata:
    """Tokens grouped by adapter and cut into work tiles; see `lora_sgmv_metadata`.

    Group ``g`` in ``[0, n)`` holds adapter g's tokens; group ``n`` holds the tokens without
    an adapter (id -1), which the kernels still visit so that every output row is written.
    """

    num_tokens: int
    num_adapters: int
    block_m: int
    sorted_tokens: torch.Tensor  # [T] int32, token ids ordered by group
    group_start: torch.Tensor  # [n+1] int32, offset of each group in sorted_tokens
    group_count: torch.Tensor  # [n+1] int32, tokens per group
    work_group: torch.Tensor  # [W] int32, group of each tile, -1 for an unused slot
    work_start: torch.Tensor  # [W] int32, first position of the tile in sorted_tokens
    work_end: torch.Tensor  # [W] int32, one past its last position

    @property
    def num_work(self) -> int:
        """Length of the work list: an upper bound on the tiles, fixed without a host sync."""
        return self.work_group.numel()

    def tensors(self) -> list[torch.Tensor]:
        """The tensors, in field order: with ``block_m`` all that `from_tensors` needs."""
        return [self.sorted_tokens, self.group_start, self.group_count, self.work_group, self.work_start,
                self.work_end]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], block_m: int) -> LoraSgmvMetadata:
        """Rebuild from `tensors` (how the metadata crosses the torch.library op boundary)."""
        sorted_tokens, group_start = tensors[0], tensors[1]
        return cls(sorted_tokens.numel(), group_start.numel() - 1, block_m, *tensors)


def default_block_m(num_tokens: int, num_segments: int) -> int:
    """Tile height: 16 rows when segments are short (decode, BGMV), 64 for prefill."""
    return 16 if num_tokens < 32 * max(num_segments, 1) else 64


def lora_sgmv_metadata(seg_indptr: torch.Tensor, seg_adapter: torch.Tensor, num_tokens: int,
                       num_adapters: int, *, block_m: int | None = None) -> LoraSgmvMetadata:
    """Build the per-batch metadata of `lora_sgmv` once; pass it as ``metadata=`` to every layer.

    Args:
        seg_indptr: ``[S+1]`` int segment boundaries (as for `lora_sgmv`).
        seg_adapter: ``[S]`` int adapter id per segment, -1 for none.
        num_tokens: T, the number of tokens (rows of x).
        num_adapters: n, the number of adapters in the pool (``A.shape[0]``).
        block_m: tokens per tile (default: `default_block_m`).

    Ids outside ``[0, n)`` are treated as "no adapter", so the result is always safe to index
    with. The arguments are trusted: `v2l_fast.ops.lora_sgmv_metadata` validates them.
    """
    T, n, dev = num_tokens, num_adapters, seg_indptr.device
    bm = block_m if block_m is not None else default_block_m(T, seg_adapter.numel())
    lengths = (seg_indptr[1:] - seg_indptr[:-1]).long()
    token_adapter = torch.repeat_interleave(seg_adapter.long(), lengths, output_size=T)
    group = torch.where((token_adapter < 0) | (token_adapter >= n), n, token_adapter)
    sorted_tokens = torch.argsort(group, stable=True)
    count = torch.zeros(n + 1, dtype=torch.long, device=dev).index_add_(0, group, torch.ones_like(group))
    start = torch.cumsum(count, 0) - count
    tiles = (count + bm - 1) // bm
    tiles_end = torch.cumsum(tiles, 0)
    # Σ_g ceil(c_g / bm) ≤ ceil(T / bm) + (number of non-empty groups): a bound known on the host.
    num_work = -(-T // bm) + min(n + 1, T)
    slot = torch.arange(num_work, device=dev)
    slot_group = torch.searchsorted(tiles_end, slot, right=True)
    used = slot_group <= n
    g = slot_group.clamp(max=n)
    tile_start = start[g] + (slot - (tiles_end[g] - tiles[g])) * bm
    tile_end = torch.minimum(tile_start + bm, start[g] + count[g])
    i32 = torch.int32
    return LoraSgmvMetadata(
        num_tokens=T, num_adapters=n, block_m=bm, sorted_tokens=sorted_tokens.to(i32),
        group_start=start.to(i32), group_count=count.to(i32),
        work_group=torch.where(used, g, -1).to(i32), work_start=tile_start.to(i32),
        work_end=tile_end.to(i32))

