"""PEFT LoRA directories: one v2l_fast adapter out (`export_peft`), back in (`import_peft`), and
the bias-folded base model they can be served on (`export_folded_base`); docs/peft_vllm.md.

An exported directory is a standard PEFT LoRA adapter that ``peft.PeftModel.from_pretrained``
and vLLM (``--enable-lora``) read: ``adapter_config.json`` (LORA, CAUSAL_LM, target_modules
``["down_proj"]``) and ``adapter_model.safetensors`` holding, for every text decoder layer i,
``base_model.model.model.text_model.layers.{i}.mlp.down_proj.lora_A.weight [r, I]`` and
``….lora_B.weight [H, r]``.

Scaling. PEFT and vLLM compute ``(lora_alpha / r) · lora_B · lora_A · x``; v2l_fast applies α =
2·r^1.5 as is (docs/method.md §4). The export writes ``lora_alpha = r``, so the scale is exactly
1.0 in both, and puts α into ``lora_B = α · Bᵀ`` (one fp32 product per value). The alternative,
``lora_alpha = α·r``, needs a non-integer ``lora_alpha`` whenever α is not an integer (r = 8: α =
45.25…), vLLM types the field as an int, and r changes with padding; folding α into lora_B is
exact up to one rounding in every case.

Rank. vLLM only accepts ``--max-lora-rank`` in `VLLM_LORA_RANKS`, so the export pads the rank
with zero rows (which add nothing) up to the next rank of that set; with ``max_rank`` below the
adapter's rank it first re-compresses to the best rank-``max_rank`` approximation
(`v2l_fast.ops.compose_adapters`, docs/method.md §5). v2l_fast's own values (α, the rows before
padding, bias_rank, the base fingerprint, the folded bias digest) ride in the safetensors
metadata, which PEFT and vLLM ignore and `import_peft` reads back.

Writes are atomic: everything goes into a temporary directory beside the target, is fsynced,
and is renamed into place at the end; a crash leaves no directory or a complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from v2l_fast.adapters.core import MATCHED_FIELDS, Adapters, base_fingerprint
from v2l_fast.adapters.fold import FoldedBias, fold_bias
from v2l_fast.compat import check_fits
from v2l_fast.data.manifest import fsync_folder
from v2l_fast.errors import fail

FORMAT = "v2l_fast.peft/1"
# The ranks vLLM accepts for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_KEY = "base_model.model.model.text_model.layers.{layer}.mlp.down_proj.lora_{factor}.weight"
_KEY_PATTERN = re.compile(r"base_model\.model\.model\.text_model\.layers\.(\d+)\.mlp\.down_proj\.lora_([AB])\.weight")
# Files of a model directory besides weights and tokenizer that a processor (vLLM's) reads.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts (`VLLM_LORA_RANKS`) that holds ``rank`` rows."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    fail("rank", f"at most {VLLM_LORA_RANKS[-1]} (vLLM's largest max_lora_rank); pass max_rank to re-compress",
         rank)


def export_peft(adapters: Adapters, out_dir: str | os.PathLike, *, index: int = 0,
                base_model_name_or_path: str | None = None, max_rank: int | None = None,
                folded: FoldedBias | None = None) -> str:
    """Write adapter ``index`` of ``adapters`` as a PEFT LoRA directory ``out_dir`` (new); return its path.

    Args:
        adapters: v2l_fast `Adapters` (e.g. `Adapters.load` of an ``internalize`` file).
        out_dir: the directory to create; it must not exist yet (never overwritten).
        index: which adapter (video) to export.
        base_model_name_or_path: written to ``adapter_config.json`` (default: the name in the
            adapters' fingerprint; pass the folded base's directory for a folded export).
        max_rank: the largest rank the export may have, one of `VLLM_LORA_RANKS` (e.g. the
            server's ``--max-lora-rank``); an adapter of higher rank is re-compressed to it.
            Default: no re-compression (the rank is only padded).
        folded: the `FoldedBias` of a folded base (`fold_bias`, `export_folded_base`): export the
            per-video rows only (the bias block is checked to be the folded one), for that base.
            Default: the full adapter, bias block included, for the original base model.

    Returns:
        ``out_dir`` as a str.
    """
    if not isinstance(adapters, Adapters):
        fail("adapters", "an Adapters", type(adapters).__name__)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(adapters):
        fail("index", f"an int in [0, {len(adapters)}) (the adapters hold {len(adapters)})", repr(index))
    if max_rank is not None and max_rank not in VLLM_LORA_RANKS:
        fail("max_rank", f"one of vLLM's ranks {list(VLLM_LORA_RANKS)}", repr(max_rank))
    if folded is not None:
        adapters = folded.strip(adapters[index])
        index = 0
    out_dir = _check_new_dir(out_dir, "out_dir")
    A = adapters.A[index].detach().to(device="cpu", dtype=torch.float32)  # [L, R, I]
    B = adapters.B[index].detach().to(device="cpu", dtype=torch.float32)  # [L, R, H]
    bias_rank = adapters.bias_rank
    if max_rank is not None and A.shape[1] > max_rank:  # max_rank is a vLLM rank: padding stays within it
        from v2l_fast.ops import compose_adapters

        A, B = compose_adapters([A], [B], max_rank=max_rank)
        bias_rank = 0  # the bias block is mixed into the re-compressed rows
    rows = A.shape[1]
    rank = vllm_rank(rows)
    lora_A = torch.zeros(A.shape[0], rank, A.shape[2])
    lora_A[:, :rows] = A
    lora_B = torch.zeros(B.shape[0], B.shape[2], rank)
    lora_B[:, :, :rows] = adapters.alpha * B.mT
    tensors = {}
    for layer in range(A.shape[0]):
        tensors[_KEY.format(layer=layer, factor="A")] = lora_A[layer].contiguous()
        tensors[_KEY.format(layer=layer, factor="B")] = lora_B[layer].contiguous()
    name = base_model_name_or_path if base_model_name_or_path is not None else adapters.base.get("name") or None
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "target_modules": ["down_proj"], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
              "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
              "inference_mode": True, "base_model_name_or_path": name, "revision": None}
    metadata = {"format": "pt", "v2l_fast.format": FORMAT, "v2l_fast.alpha": repr(float(adapters.alpha)),
                "v2l_fast.rank": str(rows), "v2l_fast.bias_rank": str(bias_rank),
                "v2l_fast.base": json.dumps(adapters.base),
                "v2l_fast.folded_bias": folded.digest if folded is not None else ""}
    from safetensors.torch import save

    with _atomic_dir(out_dir) as tmp:
        _write(os.path.join(tmp, CONFIG_FILE), (json.dumps(config, indent=2) + "\n").encode())
        _write(os.path.join(tmp, WEIGHTS_FILE), save(tensors, metadata=metadata))
    return out_dir


def export_folded_base(vlm, bias_A: torch.Tensor, bias_B: torch.Tensor, alpha: float,
                       out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None) -> FoldedBias:
    """Fold the bias block into ``vlm.model`` (in place, `fold_bias`) and save the folded model.

    ``out_dir`` (new) receives ``save_pretrained`` of the model (its config carries the
    `FoldedBias` record), the tokenizer, and the processor files: copied from ``source`` (the
    directory the VLM was loaded from; hub ids are fetched with ``huggingface_hub``) when given;
    a ``preprocessor_config.json`` written from ``vlm.preprocessor`` where there is none. vLLM serves this
    directory with per-video adapters from ``export_peft(..., folded=record)``;
    `v2l_fast.vlm.load_smolvlm` loads it back.

    Returns:
        The `FoldedBias` record.
    """
    from v2l_fast.vlm.load import VLM

    if not isinstance(vlm, VLM):
        fail("vlm", "a v2l_fast.vlm.VLM (model, tokenizer and preprocessor, e.g. from load_smolvlm)",
             type(vlm).__name__)
    out_dir = _check_new_dir(out_dir, "out_dir")
    extra = _processor_files(os.fspath(source)) if source is not None else {}
    extra.setdefault("preprocessor_config.json", json.dumps(_preprocessor_dict(vlm.preprocessor), indent=1).encode())
    record = fold_bias(vlm.model, bias_A, bias_B, alpha)
    with _atomic_dir(out_dir) as tmp:
        vlm.model.save_pretrained(tmp)
        vlm.tokenizer.save_pretrained(tmp)
        for name, data in extra.items():
            _write(os.path.join(tmp, name), data)
    return record


def import_peft(directory: str | os.PathLike, *, base: torch.nn.Module | dict | None = None) -> Adapters:
    """Read a PEFT LoRA directory of `export_peft`'s layout (down_proj of every text layer) as `Adapters`.

    Directories written by `export_peft` come back as they went out: α, the rows before padding,
    bias_rank and the base fingerprint are read from their metadata. Other PEFT LoRA directories
    of this layout come back with α = ``lora_alpha / r`` (``/ √r`` with rsLoRA) and need ``base``.

    Args:
        directory: the PEFT adapter directory.
        base: the base model (or its `base_fingerprint`) the adapter is used with; checked
            against the fingerprint the directory carries, and used when it carries none.

    Returns:
        `Adapters` with one adapter, ``A [1, L, r, I]``, ``B [1, L, r, H]`` (fp32).
    """
    from safetensors import SafetensorError, safe_open

    directory = os.fspath(directory)
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        fail("directory", f"a PEFT LoRA directory ({CONFIG_FILE} and {WEIGHTS_FILE})", repr(directory))
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as err:
        fail("directory", f"a readable {CONFIG_FILE}", f"{config_path!r} ({err})")
    _check_config(config, config_path)
    try:
        with safe_open(weights_path, framework="pt") as f:
            metadata = f.metadata() or {}
            names = f.keys()
            tensors = {key: f.get_tensor(key) for key in names}
    except (SafetensorError, OSError) as err:
        fail("directory", f"a readable {WEIGHTS_FILE}", f"{weights_path!r} ({err})")
    lora_A, lora_B = _layer_factors(tensors, config["r"], weights_path)
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    mine = base_fingerprint(base) if isinstance(base, torch.nn.Module) else base
    if metadata.get("v2l_fast.format") == FORMAT:
        alpha, rows = float(metadata["v2l_fast.alpha"]), int(metadata["v2l_fast.rank"])
        fingerprint, bias_rank = json.loads(metadata["v2l_fast.base"]), int(metadata["v2l_fast.bias_rank"])
        if mine is not None:
            check_fits("directory", "adapters", fingerprint, {key: mine[key] for key in MATCHED_FIELDS},
                       names=(fingerprint.get("name"), mine.get("name")))
    else:
        if mine is None:
            fail("base", "the base model or its base_fingerprint (the directory carries no v2l_fast fingerprint)",
                 "None")
        alpha, rows, fingerprint, bias_rank = scale, config["r"], dict(mine), 0
    A = lora_A[:, :rows]
    B = lora_B[:, :, :rows].mT * scale / alpha
    return Adapters(A[None].contiguous(), B[None].contiguous(), alpha, fingerprint, bias_rank)


# PEFT LoRA options that change what the factors mean: import_peft takes only these values…
_PLAIN = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False}
# …and only empty (or absent) ones of these.
_UNSET = ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern")


def _check_config(config: dict, path: str) -> None:
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        fail("directory", "a PEFT LoRA adapter (peft_type 'LORA')",
             f"{path!r} with peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}")
    targets = config.get("target_modules")
    if targets not in ("down_proj", ["down_proj"]):
        fail("directory", "a LoRA of target_modules ['down_proj'] (the Frames2LoRA targets)",
             f"{path!r} with target_modules {targets!r}")
    for key, value in _PLAIN.items():
        if config.get(key, value) != value:
            fail("directory", f"a plain LoRA ({key} = {value!r})", f"{path!r} with {key} = {config[key]!r}")
    for key in _UNSET:
        if config.get(key):
            fail("directory", f"a plain LoRA (no {key})", f"{path!r} with {key} = {config[key]!r}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            fail("directory", f"a positive {key} in {CONFIG_FILE}", f"{path!r} with {key} = {value!r}")


def _layer_factors(tensors: dict, rank: int, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_A [L, r, I]`` and ``lora_B [L, H, r]`` (fp32) of the adapter's tensors."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY_PATTERN.fullmatch(key)
        if match is None:
            fail("directory", "LoRA tensors of the text layers' mlp.down_proj only "
                 f"({_KEY.format(layer='i', factor='A')} and lora_B)", f"{path!r} holding {key!r}")
        found.setdefault(int(match.group(1)), {})[match.group(2)] = value
    layers = sorted(found)
    if not layers or layers != list(range(len(layers))) or any(len(found[i]) != 2 for i in layers):
        fail("directory", "lora_A and lora_B for every text layer 0 … L−1",
             f"{path!r} with layers {layers} ({sum(len(v) for v in found.values())} tensors)")
    A = [found[i]["A"] for i in layers]
    B = [found[i]["B"] for i in layers]
    I, H = A[0].shape[-1], B[0].shape[0]
    for i, (a, b) in enumerate(zip(A, B)):
        if tuple(a.shape) != (rank, I) or tuple(b.shape) != (H, rank):
            fail("directory", f"lora_A [r, I] = [{rank}, {I}] and lora_B [H, r] = [{H}, {rank}] in every layer",
                 f"{path!r} with layer {i}: lora_A {list(a.shape)}, lora_B {list(b.shape)}")
    return torch.stack(A).float(), torch.stack(B).float()


def _check_new_dir(path: str | os.PathLike, name: str) -> str:
    path = os.fspath(path)
    if os.path.lexists(path):
        fail(name, "a path that does not exist yet (an export never overwrites)", repr(path))
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        fail(name, "a path in an existing directory", f"{path!r}, whose directory {parent!r} does not exist")
    return path


@contextmanager
def _atomic_dir(path: str) -> Iterator[str]:
    """A temporary directory beside ``path``, fsynced and renamed to ``path`` when the block ends
    without error, removed otherwise: ``path`` appears complete or not at all."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as handle:
                    os.fsync(handle.fileno())
            fsync_folder(root)
        if os.path.lexists(path):
            fail("out_dir", "a path that does not exist yet (an export never overwrites)",
                 f"{path!r}, created while the export was being written")
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    fsync_folder(parent)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _processor_files(source: str) -> dict[str, bytes]:
    """The `PROCESSOR_FILES` of a model directory or hub repo that exist there, as bytes."""
    directory = source
    if not os.path.isdir(directory):
        from huggingface_hub import snapshot_download

        directory = snapshot_download(source, allow_patterns=list(PROCESSOR_FILES))
    files = {}
    for name in PROCESSOR_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                files[name] = handle.read()
    return files


def _preprocessor_dict(preprocessor) -> dict:
    """A ``preprocessor_config.json`` from a `VideoPreprocessor` (the fields ``for_model`` reads)."""
    return {"image_processor_type": "SmolVLMImageProcessor",
            "max_image_size": {"longest_edge": preprocessor.max_image_size},
            "image_mean": list(preprocessor.image_mean), "image_std": list(preprocessor.image_std),
            "rescale_factor": preprocessor.rescale_factor, "resample": preprocessor.resample,
            "v2l_fast": {"longest_edge": preprocessor.longest_edge},
            "video_sampling": {"fps": preprocessor.fps}}
