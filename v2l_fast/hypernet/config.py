"""Architecture of a Frames2LoRA hypernetwork (docs/method.md §0, §3–§4, §6).

One frozen dataclass holds every number that fixes the module's shapes, so a checkpoint's
architecture can be compared with the base model it is meant for before any weight is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from v2l_fast.errors import fail

# The official Perceiver fixes its attention geometry in code, not in the CLI (spec §0).
DEFAULT_NUM_HEADS = 16
DEFAULT_HEAD_DIM = 128
DEFAULT_NUM_KV_HEADS = 4


@dataclass(frozen=True)
class Frames2LoRAConfig:
    """Shapes of a Frames2LoRA hypernetwork for one base model and rank.

    Base-model dimensions: ``num_layers`` (L), ``hidden_size`` (H), ``intermediate_size`` (I,
    the input width of ``down_proj``) and ``rank`` (r, per chunk). Perceiver: ``latent_size``
    (D), ``num_latent_queries`` (Q), ``num_blocks`` (NB), ``num_self_attn_per_block`` (NS),
    ``num_heads``/``head_dim``/``num_kv_heads`` (nh, hd, nkv). Head: ``num_pre_head_layers``
    ResMLP blocks. ``base_model_name_or_path`` is metadata only (the VLM the checkpoint was
    trained for); it is not part of the architecture.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    rank: int = 16
    latent_size: int = 512
    num_latent_queries: int = 8
    num_blocks: int = 9
    num_self_attn_per_block: int = 0
    num_heads: int = DEFAULT_NUM_HEADS
    head_dim: int = DEFAULT_HEAD_DIM
    num_kv_heads: int = DEFAULT_NUM_KV_HEADS
    num_pre_head_layers: int = 1
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int":
                minimum = 0 if field.name == "num_self_attn_per_block" else 1
                if type(value) is not int or value < minimum:
                    fail(field.name, f"an int ≥ {minimum}", value)
            elif field.type == "float" and (type(value) not in (int, float) or value <= 0):
                fail(field.name, "a positive float", value)
        if self.num_heads % self.num_kv_heads:
            fail("num_heads", f"a multiple of num_kv_heads = {self.num_kv_heads}", self.num_heads)

    @property
    def lora_alpha(self) -> float:
        """The LoRA scaling α = 2·r^1.5, applied as is (not divided by the rank; spec §4)."""
        return 2.0 * self.rank ** 1.5

    @property
    def head_width(self) -> int:
        """d_lora = I + H: one head output row holds an A row then a B row."""
        return self.intermediate_size + self.hidden_size

    @property
    def adapter_rank(self) -> int:
        """Rank of one video's combined adapter: r generated rows plus r bias rows (spec §5)."""
        return 2 * self.rank

    @classmethod
    def for_vlm(cls, vlm_config, rank: int = 16, **overrides) -> Frames2LoRAConfig:
        """The released architecture (spec §6 presets) for a SmolVLM2 / Llama-family config.

        ``vlm_config`` is a transformers config with a ``text_config`` (SmolVLM2) or a text
        config itself; L, H and I are read from it. ``overrides`` replace any other field.
        """
        text = getattr(vlm_config, "text_config", vlm_config)
        dims = {}
        for name in ("num_hidden_layers", "hidden_size", "intermediate_size"):
            value = getattr(text, name, None)
            if not isinstance(value, int):
                fail("vlm_config", f"a transformers config whose text config has an int {name}",
                     type(vlm_config).__name__)
            dims[name] = value
        name_or_path = getattr(vlm_config, "_name_or_path", "") or None
        fields = dict(num_layers=dims["num_hidden_layers"], hidden_size=dims["hidden_size"],
                      intermediate_size=dims["intermediate_size"], rank=rank,
                      base_model_name_or_path=name_or_path)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        """Plain-JSON form (see `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Frames2LoRAConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            fail("config", "a dict of Frames2LoRAConfig fields", type(data).__name__)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            fail("config", f"only Frames2LoRAConfig fields {sorted(known)}", f"unknown keys {unknown}")
        return cls(**data)

