"""The top-level API: internalize videos into adapters, then ask with zero visual tokens.

    session = v2l_fast.load(vlm="HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
                            hypernet="frames2lora-smolvlm2-500m-best-ce.pt")
    adapters = session.internalize(["a.mp4", "b.mp4"])     # one VLM + hypernetwork forward
    answers = session.ask(adapters, ["What happens?", "Who is there?"])

`internalize` and `ask` are also plain functions taking ``vlm=`` (a `VLM`) and ``hypernet=``.
Everything runs through `v2l_fast.ops`, so one backend setting switches the kernels of the
whole stack (the hypernetwork's Perceiver and SwiGLU, the answer model's LoRA): ``backend=``
on `load`, `Session` or a call runs it inside `v2l_fast.ops.use_backend`; the default
``"auto"`` keeps the setting in force (an enclosing `use_backend`, else ``$V2L_BACKEND``,
else each op's automatic choice).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from v2l_fast.adapters import Adapters, base_fingerprint
from v2l_fast.adapters.fold import folded_bias_of
from v2l_fast.compat import base_dimensions, check_fits
from v2l_fast.errors import fail
from v2l_fast.ops.registry import BACKENDS, runtime_missing, use_backend
from v2l_fast.vlm.features import extract_features
from v2l_fast.vlm.frames import DEFAULT_INSTRUCTION, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, build_video_batch
from v2l_fast.vlm.load import VLM, load_smolvlm
from v2l_fast.vlm.lora_patch import LoRAPatch, down_proj_targets, is_patched
from v2l_fast.vlm.video import Video, read_video

DEFAULT_MAX_NEW_TOKENS = 128


def as_list(items, name: str, single: tuple[type, ...]) -> list:
    """``items`` as a non-empty list: one item of a ``single`` type becomes ``[item]``; anything
    else that is not a non-empty sequence is refused naming ``name``."""
    if isinstance(items, single):
        return [items]
    if not isinstance(items, Sequence) or not items:
        fail(name, "a non-empty list", type(items).__name__ if not isinstance(items, Sequence) else "[]")
    return list(items)


def _as_video(item, vlm: VLM, index: int) -> Video:
    if isinstance(item, Video):
        return item
    if isinstance(item, (str, os.PathLike)):
        return read_video(item, max_frames=vlm.preprocessor.max_frames, target_fps=vlm.preprocessor.fps)
    if isinstance(item, (np.ndarray, list, tuple)):
        return Video.from_frames(item, source=f"videos[{index}]")
    fail(f"videos[{index}]", "a file path, a Video, a list of PIL images or a uint8 array [F, H, W, 3]",
         type(item).__name__)


def batch_ranges(n: int, batch_size: int | None, progress: bool | None, desc: str):
    """``(start, end)`` of consecutive batches of at most ``batch_size`` of ``n`` items (None: one
    batch), under a tqdm bar named ``desc`` (None: shown when there is more than one batch)."""
    size = n if batch_size is None else batch_size
    if not isinstance(size, int) or size < 1:
        fail("batch_size", "a positive int or None", batch_size)
    starts = range(0, n, size)
    show = len(starts) > 1 if progress is None else progress
    for start in tqdm(starts, desc=desc, disable=not show):
        yield start, min(start + size, n)


def _check_backend(backend: str, device: torch.device) -> None:
    if backend == "auto":
        return
    if backend not in BACKENDS:
        fail("backend", f"'auto' or one of {BACKENDS}", repr(backend))
    missing = runtime_missing(backend, device)
    if missing:
        fail("backend", f"a backend that can run on {device}", f"{backend!r}, which cannot: {missing}")


@contextmanager
def backend_scope(backend: str, device: torch.device):
    """Run the block with ``backend`` for every op (``"auto"``: the setting in force)."""
    _check_backend(backend, device)
    if backend == "auto":
        yield
    else:
        with use_backend(backend):
            yield


def check_base_model(vlm: VLM) -> None:
    """Refuse a VLM whose ``down_proj`` is not the base model's (a LoRA patch on it, or a folded
    bias block): internalization reads the base model's features."""
    if is_patched(vlm.model):
        fail("vlm", "a model without a LoRA patch while internalizing (features come from the base model)",
             "a patched model")
    if folded_bias_of(vlm.model) is not None:
        fail("vlm", "a model whose down_proj holds no folded bias block while internalizing (features come from "
             "the base model; serve.internalizer.unfolded_copy keeps one beside a serving engine)", "a folded model")


def check_hypernet(hypernet, model: torch.nn.Module) -> None:
    """Refuse a hypernetwork made for a model of other dimensions than ``model``."""
    check_fits("hypernet", "a hypernetwork", base_dimensions(hypernet.config), base_dimensions(model))


def generate_adapters(clips: list[Video], *, vlm: VLM, hypernet, instruction: str):
    """One batch of the internalisation: the clips' video prompts through the VLM (stacked layer
    states) and the hypernetwork, under ``no_grad``; the hypernetwork's `GeneratedAdapters`."""
    hn_device = next(hypernet.parameters()).device
    batch = build_video_batch(clips, instruction, vlm.tokenizer, vlm.preprocessor, pad_token_id=pad_id(vlm.tokenizer))
    features, mask = extract_features(vlm.model, batch)
    with torch.no_grad():
        return hypernet.generate(features.to(hn_device), mask.to(hn_device))


def internalize(videos, *, vlm: VLM, hypernet, instruction: str = DEFAULT_INSTRUCTION,
                batch_size: int | None = None, progress: bool | None = None, backend: str = "auto") -> Adapters:
    """Turn videos into LoRA adapters: one VLM forward and one hypernetwork forward per batch.

    Args:
        videos: a list of videos, each a file path (decoded with PyAV and sampled as
            SmolVLM2 does), a `Video`, a list of PIL images or a uint8 array ``[F, H, W, 3]``
            (frames used as given); a single path or `Video` is one video.
        vlm: the `VLM` (model, tokenizer, preprocessing); its ``down_proj`` must not be patched.
        hypernet: a `v2l_fast.hypernet.Frames2LoRA` for this VLM.
        instruction: the internalisation text after the video (spec §2 default).
        batch_size: videos per forward (None: all at once).
        progress: tqdm bar (None: shown when there is more than one batch).
        backend: kernel backend of every op (``"torch"``, ``"triton"``, ``"cuda"``, ``"cpp"``;
            ``"auto"``: the setting in force), refused up front if it cannot run here.

    Returns:
        `Adapters` with one adapter per video, in order, tagged with the VLM's fingerprint.
    """
    videos = as_list(videos, "videos", (str, os.PathLike, Video))
    check_hypernet(hypernet, vlm.model)
    check_base_model(vlm)
    hn_device = next(hypernet.parameters()).device
    A, B, alpha = [], [], None
    with backend_scope(backend, hn_device):
        for start, end in batch_ranges(len(videos), batch_size, progress, "internalize"):
            clips = [_as_video(item, vlm, start + i) for i, item in enumerate(videos[start:end])]
            out = generate_adapters(clips, vlm=vlm, hypernet=hypernet, instruction=instruction)
            A.append(out.A)
            B.append(out.B)
            alpha = out.alpha
    return Adapters(torch.cat(A), torch.cat(B), alpha, base_fingerprint(vlm.model), hypernet.config.rank)


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id (its end-of-sequence id when it has none)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def question_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a text-only question: the tokenizer's chat template, generation prompt on."""
    return conversation_ids(tokenizer, [{"role": "user", "content": [{"type": "text", "text": prompt}]}])


def conversation_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """Token ids of a chat (``[{"role", "content": [{"type": "text", "text"}]}, …]``) through the
    tokenizer's chat template, generation prompt on: the context of the answer's first token."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def visual_token_ids(vlm: VLM) -> set[int]:
    """Ids of the tokens that stand for images in a SmolVLM2 prompt (`<image>`, its fake-image
    and global-image markers): a text-only context holds none of them."""
    tokenizer = vlm.tokenizer
    visual = {vlm.model.config.image_token_id}
    for token in (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if tokenizer.convert_ids_to_tokens(token_id) == token:  # not the unknown-token id
            visual.add(token_id)
    return visual


def ask(adapters: Adapters | None, prompts, *, vlm: VLM, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: int | None = None, progress: bool | None = None, backend: str = "auto") -> list[str]:
    """Answer text-only prompts with the VLM, adapter i applied to prompt i; zero visual tokens.

    Args:
        adapters: one adapter per prompt (`Adapters` from `internalize` or `Adapters.load`;
            ``adapters[[0, 0, 1]]`` repeats videos), or None for the plain base model.
        prompts: the questions (a list of str, or one str).
        vlm: the `VLM` the adapters were made for (checked with their fingerprint).
        max_new_tokens: greedy decoding length limit (spec §8: 128).
        batch_size: prompts per ``generate`` call (None: all at once; left padding).
        progress: tqdm bar (None: shown when there is more than one batch).
        backend: kernel backend of the LoRA (as `internalize`'s).

    Returns:
        The decoded answers (special tokens skipped, whitespace stripped), in order.
    """
    prompts = as_list(prompts, "prompts", (str,))
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            fail(f"prompts[{i}]", "a str", type(prompt).__name__)
    if adapters is not None:
        if not isinstance(adapters, Adapters):
            fail("adapters", "an Adapters (from internalize or Adapters.load) or None", type(adapters).__name__)
        if len(adapters) != len(prompts):
            fail("adapters", f"one adapter per prompt ({len(prompts)} prompts; index adapters to repeat one)",
                 f"{len(adapters)} adapters")
        adapters.check_base(vlm.model)
    tokenizer, model = vlm.tokenizer, vlm.model
    visual_ids = visual_token_ids(vlm)
    ids = [question_ids(tokenizer, prompt) for prompt in prompts]
    for i, row in enumerate(ids):
        if visual_ids.intersection(row):
            fail(f"prompts[{i}]", "text without image tokens (the answer model sees no visual tokens)",
                 repr(prompts[i][:80]))
    answers: list[str] = []
    pad = pad_id(tokenizer)
    with backend_scope(backend, vlm.device):
        for start, end in batch_ranges(len(prompts), batch_size, progress, "ask"):
            input_ids, attention_mask = left_pad(ids[start:end], pad, vlm.device)
            chunk = adapters[start:end].to(vlm.device) if adapters is not None else None
            answers += greedy_answers(model, chunk, input_ids, attention_mask, max_new_tokens, pad,
                                 tokenizer.eos_token_id, tokenizer)
    return answers


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[rows, width]`` of token rows left-padded with ``pad``."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row):] = torch.tensor(row)
        attention_mask[b, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def greedy_answers(model, adapters, input_ids, attention_mask, max_new_tokens, pad, eos, tokenizer,
              **model_inputs) -> list[str]:
    """Greedy answers of a left-padded batch, decoded and stripped; ``model_inputs`` (the input
    embeddings of the teacher's video prompts) go to ``generate`` as they are."""
    def run():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad, eos_token_id=eos, **model_inputs)

    if adapters is None:
        out = run()
    else:
        with LoRAPatch(down_proj_targets(model), adapters.A, adapters.B, adapters.alpha):
            out = run()
    return [text.strip() for text in tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]


class Session:
    """A VLM and its hypernetwork, held together: `internalize`, `ask`, `load_adapters`.

    ``backend`` is the kernel backend of the session's calls (``"auto"``: the setting in force
    at each call); a call's own ``backend=`` overrides it.
    """

    def __init__(self, vlm: VLM, hypernet, *, backend: str = "auto"):
        check_hypernet(hypernet, vlm.model)
        _check_backend(backend, vlm.device)
        self.vlm, self.hypernet, self.backend = vlm, hypernet, backend

    def internalize(self, videos, **kwargs) -> Adapters:
        """`internalize` with this session's models (and backend, unless ``backend=`` is given)."""
        kwargs.setdefault("backend", self.backend)
        return internalize(videos, vlm=self.vlm, hypernet=self.hypernet, **kwargs)

    def ask(self, adapters: Adapters | None, prompts, **kwargs) -> list[str]:
        """`ask` with this session's VLM (and backend, unless ``backend=`` is given)."""
        kwargs.setdefault("backend", self.backend)
        return ask(adapters, prompts, vlm=self.vlm, **kwargs)

    def load_adapters(self, path: str | os.PathLike) -> Adapters:
        """Read adapters saved with `Adapters.save`, refused if made for another base model."""
        return Adapters.load(path, model=self.vlm.model, device=self.vlm.device)


def load(vlm: str | os.PathLike | VLM, hypernet, *, dtype: torch.dtype = torch.bfloat16,
         device: str | torch.device | None = None, backend: str = "auto", **vlm_kwargs) -> Session:
    """Load a `Session`: a SmolVLM2 (hub id, directory or `VLM`) and a Frames2LoRA hypernetwork.

    Args:
        vlm: hub id or directory for `load_smolvlm`, or a loaded `VLM`.
        hypernet: a checkpoint path or state dict for `v2l_fast.hypernet.load_frames2lora`,
            or a `Frames2LoRA` module.
        dtype: VLM weight dtype when loading it (the hypernetwork keeps its own, fp32).
        device: where to run (None: CUDA when available, else CPU).
        backend: the `Session`'s kernel backend (``"auto"``: the setting in force at each call).
        vlm_kwargs: passed to `load_smolvlm` (``tokenizer=``, ``max_frames=`` …).
    """
    from v2l_fast.hypernet import load_frames2lora

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_backend(backend, device)  # before any weights are read
    if not isinstance(vlm, VLM):
        vlm = load_smolvlm(vlm, dtype=dtype, device=device, **vlm_kwargs)
    if not isinstance(hypernet, torch.nn.Module):
        hypernet = load_frames2lora(hypernet, expect=vlm.model.config, device=vlm.device)
    return Session(vlm, hypernet.to(vlm.device).eval(), backend=backend)
