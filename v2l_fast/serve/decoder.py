"""One forward of SmolVLM2's text decoder over a packed batch of requests with their own adapters.

The serving engine runs many requests at once, each at its own point: some are being prefilled
(their whole prompt), the others decode one token. `PackedDecoder` runs them all in one pass:
the tokens of every request are concatenated into ``x [T, H]`` (decode tokens first, one per
request, then each prefill's prompt), so every projection is one GEMM over all T tokens and the
``down_proj`` LoRA is one `lora_sgmv` call per layer with one segment per request
(``seg_adapter``: the request's slot in the `AdapterPool`, −1 for the base model). Only
attention is per request: a decode token attends over its slot of the `SlotKVCache` (one batched
masked SDPA over the decoding requests), a prefill attends causally over its own prompt (one SDPA
call per run of equal-length prefills; the engine sorts each step's prefills by length).

The layers are the model's own modules (Llama family: RMSNorm, rotary embedding, grouped-query
attention, SwiGLU MLP), called piece by piece, so the weights and numerics are transformers'
and greedy answers equal those of ``model.generate`` (`v2l_fast.api.ask`) for the same adapter.

Why not transformers' own continuous batching: its paged cache packs requests into one row and
its forward sees no per-request segments, so the adapter of each token could not reach the LoRA
without reaching into its internals; a slot cache of our own keeps the engine on public modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2l_fast import ops
from v2l_fast.errors import fail
from v2l_fast.ops.lora_sgmv import kernel_segments
from v2l_fast.vlm.features import inner_model
from v2l_fast.vlm.lora_patch import decoder_layers


@dataclass
class PackedBatch:
    """The tokens of one engine step and where they go (host-built, then moved once).

    Sequence s owns tokens ``[seg_indptr[s], seg_indptr[s+1])``; the first ``num_decode``
    sequences decode one token each, the rest are prefills starting at position 0.

    Attributes:
        input_ids: ``[T]`` token ids.
        positions: ``[T]`` position of each token in its request.
        token_slot: ``[T]`` KV-cache slot of each token's request.
        seg_indptr: ``[S+1]`` token offsets of the sequences.
        seg_adapter: ``[S]`` `AdapterPool` slot of each sequence, −1 for none.
        num_decode: D, how many leading sequences decode.
        prefill_groups: ``(start, count, length)`` of each run of consecutive prefills of one
            length (host ints): one causal attention call per run, not per prefill.
        max_context: the longest decode context (keys read per decoding request).
        any_adapter: whether any sequence has an adapter (else the LoRA is skipped).
        decode_mask: ``[D, 1, 1, max_context]`` bool, the cache positions each decoding request
            sees (its own context), shared by every layer's attention.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    token_slot: torch.Tensor
    seg_indptr: torch.Tensor
    seg_adapter: torch.Tensor
    num_decode: int
    prefill_groups: list[tuple[int, int, int]]
    max_context: int
    any_adapter: bool
    decode_mask: torch.Tensor

    @classmethod
    def build(cls, sequences: list[tuple[list[int], int, int, int]], num_decode: int, device) -> PackedBatch:
        """Pack ``sequences`` of ``(token_ids, first_position, kv_slot, adapter_slot)``, decodes
        first, into tensors on ``device`` (built on the host, one copy each, no device sync).
        Prefills of equal length placed side by side share one attention call."""
        ids, positions, slots, indptr, groups = [], [], [], [0], []
        for s, (tokens, start, kv_slot, _) in enumerate(sequences):
            if s >= num_decode:
                if groups and groups[-1][2] == len(tokens):
                    groups[-1][1] += 1
                else:
                    groups.append([len(ids), 1, len(tokens)])
            ids += tokens
            positions += range(start, start + len(tokens))
            slots += [kv_slot] * len(tokens)
            indptr.append(len(ids))
        adapters = [seq[3] for seq in sequences]
        max_context = max((seq[1] + 1 for seq in sequences[:num_decode]), default=0)

        def as_tensor(values):
            return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

        positions = as_tensor(positions)
        decode_mask = torch.arange(max_context, device=device) <= positions[:num_decode, None]
        return cls(as_tensor(ids), positions, as_tensor(slots), as_tensor(indptr), as_tensor(adapters),
                   num_decode, [tuple(g) for g in groups], max_context, any(a >= 0 for a in adapters),
                   decode_mask[:, None, None])


class SlotKVCache:
    """Keys and values of every layer in fixed slots: ``[slots, kv_heads, max_len, head_dim]``.

    A request owns one slot from admission to completion; its token at position p lives at index
    p of its slot. Memory: ``2 · layers · slots · max_len · kv_heads · head_dim`` elements.
    """

    def __init__(self, *, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len = num_slots, max_len

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PackedDecoder:
    """The text decoder and LM head of a SmolVLM2 (Llama family), run over `PackedBatch` es.

    Args:
        model: a SmolVLMForConditionalGeneration (or a Llama-family causal LM).
        num_slots: KV-cache slots, the most requests in flight at once.
        max_len: tokens per slot (prompt + answer).
        backend: `lora_sgmv` backend, resolved once here (``"auto"``: the setting in force).
    """

    def __init__(self, model: torch.nn.Module, *, num_slots: int, max_len: int, backend: str = "auto"):
        self.layers = decoder_layers(model)
        text = self._text_model(model)
        for i, layer in enumerate(self.layers):
            for path in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                         "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                         "mlp.act_fn"):
                obj = layer
                for part in path.split("."):
                    obj = getattr(obj, part, None)
                if obj is None:
                    fail("model", f"a Llama-family decoder (layer {i} has no {path})", type(layer).__name__)
        self.embed, self.norm, self.rotary = text.embed_tokens, text.norm, text.rotary_emb
        self.lm_head = model.lm_head
        config = getattr(model.config, "text_config", model.config)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        weight = self.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cache = SlotKVCache(num_layers=len(self.layers), num_slots=num_slots, max_len=max_len,
                                 kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=self.dtype, device=self.device)
        self.kernel = ops.resolve("lora_sgmv", backend, self.device)

    @staticmethod
    def _text_model(model: torch.nn.Module) -> torch.nn.Module:
        inner = inner_model(model)
        text = getattr(inner, "text_model", inner)
        for name in ("embed_tokens", "norm", "rotary_emb"):
            if not hasattr(text, name):
                fail("model", f"a SmolVLM2 or Llama-family model (its text model has no {name})", type(model).__name__)
        if not hasattr(model, "lm_head"):
            fail("model", "a model with an LM head (SmolVLMForConditionalGeneration)", type(model).__name__)
        return text

    @torch.no_grad()
    def forward(self, batch: PackedBatch, A: list[torch.Tensor], B: list[torch.Tensor], ranks: torch.Tensor,
                scaling: float) -> torch.Tensor:
        """Logits ``[S, vocab]`` (the model's dtype) at the last token of each sequence of ``batch``.

        ``A[l] [n, R, I]`` / ``B[l] [n, R, H]`` are layer l's pool factors, ``ranks [n]`` their
        effective ranks; the KV cache receives every token's keys and values.
        """
        x = self.embed(batch.input_ids)  # [T, H]
        cos, sin = self.rotary(x[None], batch.positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, d], broadcast over heads
        work, block_m = [], 0
        if batch.any_adapter:
            work, block_m = kernel_segments(self.kernel, batch.seg_indptr, batch.seg_adapter, x.shape[0],
                                            ranks.shape[0])
        for index, layer in enumerate(self.layers):
            x = x + self._attention(layer, index, layer.input_layernorm(x), cos, sin, batch)
            mlp = layer.mlp
            h = layer.post_attention_layernorm(x)
            inner = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
            out = mlp.down_proj(inner)
            if batch.any_adapter:
                out = self.kernel(inner, A[index], B[index], batch.seg_indptr, batch.seg_adapter, ranks, scaling, out,
                                  work, block_m)
            x = x + out
        last = batch.seg_indptr[1:] - 1
        return self.lm_head(self.norm(x.index_select(0, last)))

    def _attention(self, layer, index: int, h: torch.Tensor, cos, sin, batch: PackedBatch) -> torch.Tensor:
        attn, d = layer.self_attn, self.head_dim
        q = attn.q_proj(h).view(-1, self.heads, d)
        k = attn.k_proj(h).view(-1, self.kv_heads, d)
        v = attn.v_proj(h).view(-1, self.kv_heads, d)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        keys, values = self.cache.keys[index], self.cache.values[index]
        keys[batch.token_slot, :, batch.positions] = k
        values[batch.token_slot, :, batch.positions] = v
        out = torch.empty_like(q)
        scale = attn.scaling
        D = batch.num_decode
        if D:
            slots = batch.token_slot[:D]
            ctx = batch.max_context
            k_ctx = keys[:, :, :ctx].index_select(0, slots)  # [D, kv_heads, ctx, d]
            v_ctx = values[:, :, :ctx].index_select(0, slots)
            out[:D] = F.scaled_dot_product_attention(q[:D, :, None], k_ctx, v_ctx, attn_mask=batch.decode_mask,
                                                     scale=scale, enable_gqa=True)[:, :, 0]
        for start, count, length in batch.prefill_groups:
            span = slice(start, start + count * length)
            # [count · length, heads, d] → [count, heads, length, d]
            q_g, k_g, v_g = (t[span].unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v))
            out[span] = F.scaled_dot_product_attention(q_g, k_g, v_g, is_causal=True, scale=scale,
                                                       enable_gqa=True).transpose(1, 2).flatten(0, 1)
        return attn.o_proj(out.flatten(1))
