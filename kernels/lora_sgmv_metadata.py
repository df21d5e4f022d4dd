"""Once-per-batch segment metadata for the LoRA SGMV kernels (torch only, no triton import).

Tokens are regrouped by adapter (a stable sort of the per-token adapter id, tokens without an
adapter last) and cut into tiles of at most ``block_m`` tokens of one adapter: the work list
that the shrink, expand and gradient kernels walk. Everything is built with fixed-size device
ops (``repeat_interleave`` with ``output_size``, ``argsort``, ``index_add_``, ``cumsum``,
``searchsorted``), so building it never synchronises with the GPU, and every decoder layer of
a batch reuses it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from v2l_fast.errors import fail


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
    with; validating the segments is `lora_sgmv`'s job (``check=True``).
    """
    if not isinstance(seg_indptr, torch.Tensor) or seg_indptr.dim() != 1 or seg_indptr.numel() < 1:
        fail("seg_indptr", "a 1-D int tensor [S+1]", seg_indptr)
    if not isinstance(seg_adapter, torch.Tensor) or seg_adapter.shape != (seg_indptr.numel() - 1,):
        fail("seg_adapter", f"a 1-D int tensor [S] = [{seg_indptr.numel() - 1}]", seg_adapter)
    if not isinstance(num_tokens, int) or num_tokens < 0:
        fail("num_tokens", "an int >= 0", num_tokens)
    if not isinstance(num_adapters, int) or num_adapters < 0:
        fail("num_adapters", "an int >= 0", num_adapters)
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


class _LastBatchCache:
    """The metadata of the last (seg_indptr, seg_adapter) seen, so that per-layer calls without
    ``metadata=`` build it once per batch. Held by weak reference and checked against the
    tensors' in-place version counters, so a new or modified batch always rebuilds."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._refs: tuple | None = None
        self._meta: LoraSgmvMetadata | None = None

    def get(self, seg_indptr: torch.Tensor, seg_adapter: torch.Tensor, num_tokens: int,
            num_adapters: int) -> LoraSgmvMetadata:
        key = (seg_indptr._version, seg_adapter._version, num_tokens, num_adapters)
        refs = self._refs
        if (refs is None or key != self._key or refs[0]() is not seg_indptr or refs[1]() is not seg_adapter):
            self._meta = lora_sgmv_metadata(seg_indptr, seg_adapter, num_tokens, num_adapters)
            self._key, self._refs = key, (weakref.ref(seg_indptr), weakref.ref(seg_adapter))
        return self._meta


_cache = _LastBatchCache()


def resolve_metadata(metadata: LoraSgmvMetadata | None, seg_indptr: torch.Tensor, seg_adapter: torch.Tensor,
                     num_tokens: int, num_adapters: int) -> LoraSgmvMetadata:
    """``metadata`` after checking it fits (T, n, device), or the cached one for these segments."""
    if metadata is None:
        return _cache.get(seg_indptr, seg_adapter, num_tokens, num_adapters)
    if not isinstance(metadata, LoraSgmvMetadata):
        fail("metadata", "a LoraSgmvMetadata from lora_sgmv_metadata(...)", type(metadata).__name__)
    if (metadata.num_tokens, metadata.num_adapters) != (num_tokens, num_adapters):
        fail("metadata", f"built for T = {num_tokens} tokens and n = {num_adapters} adapters",
             f"T = {metadata.num_tokens}, n = {metadata.num_adapters}")
    if metadata.sorted_tokens.device != seg_indptr.device:
        fail("metadata", f"tensors on {seg_indptr.device}", metadata.sorted_tokens.device)
    return metadata
