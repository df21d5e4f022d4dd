"""The Frames2LoRA training loop (docs/method.md §7): only the hypernetwork learns.

Each step: the frozen VLM's stacked layer states of a batch of videos (fresh, or read from the
feature cache), one generated adapter per video, and spec §7's teacher-forced CE over the answer
tokens of that video's questions, all of a video's rows sharing its adapter through `LoRAPatch`
segments (`v2l_fast.train.objective.adapter_objective`). AdamW, cosine schedule with linear warm-up,
gradient clipping, gradient accumulation, bf16 autocast where the device multiplies bf16 in
hardware (CUDA; a CPU with AMX: `v2l_fast.precision`), the Perceiver included.

With ``kl_weight`` > 0 the loss is CE + kl_weight · KL (spec §7): the frozen VLM, unpatched, also
reads every row with its video in context (`v2l_fast.train.distill`) and the student's answer
distribution is pulled towards it. The teacher needs the step's pixels, so every video is then
decoded and preprocessed each step even when its features are cached (the cache still spares
the feature forward), and each row costs one more VLM forward over its video's tokens (vision
tower once per video, decoder once per row, under ``no_grad``): 12 frames of 64 visual tokens
on SmolVLM2-500M, where the student's text-only row has tens of tokens. Metrics then log ``ce``
and ``kl`` besides ``loss``; the validation CE is the CE alone.

Data order: the items (a video with up to ``questions_per_video`` of its rows) form one endless
stream, epoch e being the permutation drawn from ``(seed, e)``; global step s takes the next
``videos_per_device × world_size × grad_accum`` items. The order is a pure function of the seed
and the position, which a checkpoint stores with the optimizer, scheduler and RNG states: a run
killed and started again with the same command continues exactly where its last checkpoint was.

Distributed: started by ``torchrun`` (``WORLD_SIZE`` > 1), every rank runs the same command; the
process group is gloo on CPU and nccl on CUDA (device ``cuda:LOCAL_RANK``). Micro-step a of a
step is one slice of the global batch, cut into disjoint per-rank shards; each rank's loss is
weighted by its share of the slice's rows, so N ranks compute the gradient of the same loss as
one process holding the whole slice. `DistributedDataParallel` wraps the hypernetwork only (the
frozen VLM is never synchronised) and skips the all-reduce (``no_sync``) on accumulation
micro-steps. Rank 0 alone writes checkpoints and logs; all ranks read the checkpoint to resume
(multi-node runs need OUT on a shared file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import time
import weakref
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from v2l_fast.api import pad_id
from v2l_fast.data.loader import VideoQADataset, describe_rows, worker_start_method
from v2l_fast.data.manifest import ManifestRow, read_manifest
from v2l_fast.errors import fail
from v2l_fast.hypernet import Frames2LoRA, Frames2LoRAConfig, load_frames2lora
from v2l_fast.precision import bf16_matmul_hardware, training_autocast
from v2l_fast.train import checkpoint as ckpt
from v2l_fast.train.config import TrainConfig
from v2l_fast.train.denormals import flush_denormals
from v2l_fast.train.distill import TeacherBatch, teacher_answer_logits, teacher_batch
from v2l_fast.train.features_cache import FeatureCache, pad_videos, settings_key, trim
from v2l_fast.train.objective import LossTerms, adapter_objective, cached_student_row_ids, student_batch
from v2l_fast.vlm.features import extract_features
from v2l_fast.vlm.frames import VideoBatch, build_video_batch
from v2l_fast.vlm.load import VLM, load_smolvlm
from v2l_fast.vlm.video import Video, VideoError, read_video

METRICS_FILE = "metrics.jsonl"
# Settings a resumed run must share with the checkpoint for the continuation to be exact.
RESUME_FIXED = ("seed", "lr", "weight_decay", "betas", "eps", "warmup_ratio", "max_steps", "questions_per_video",
                "max_grad_norm", "instruction", "max_frames", "kl_weight", "kl_temperature")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: global rank, world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes checkpoints and logs."""
        return self.rank == 0


def setup_distributed(device: torch.device) -> Distributed:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world_size, device)


class DataOrder:
    """Which items each rank takes at each micro-step: a pure function of (seed, position).

    Epoch e is ``numpy.random.default_rng([seed, e]).permutation(num_items)``; the epochs form
    one stream and global step s takes items ``[s·G, (s+1)·G)`` of it, G the global batch.
    Micro-step a takes the a-th slice of ``videos_per_device × world_size`` items, whose k-th
    run of ``videos_per_device`` is rank k's.
    """

    def __init__(self, num_items: int, seed: int, videos_per_device: int, world_size: int, grad_accum: int):
        self.num_items, self.seed = num_items, seed
        self.per_device, self.world_size, self.grad_accum = videos_per_device, world_size, grad_accum
        self.epoch_order = lru_cache(maxsize=4)(self._permutation)

    @property
    def global_batch(self) -> int:
        """Items (videos) per optimizer step, over all ranks and micro-steps."""
        return self.per_device * self.world_size * self.grad_accum

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def stream(self, position: int, count: int) -> list[int]:
        """``count`` items of the stream from ``position`` on."""
        out = []
        while len(out) < count:
            epoch, offset = divmod(position + len(out), self.num_items)
            order = self.epoch_order(epoch)
            out.extend(int(i) for i in order[offset:offset + count - len(out)])
        return out

    def micro_step(self, step: int, micro: int) -> list[list[int]]:
        """The items of every rank (one list per rank) at micro-step ``micro`` of step ``step``."""
        width = self.per_device * self.world_size
        items = self.stream(step * self.global_batch + micro * width, width)
        return [items[r * self.per_device:(r + 1) * self.per_device] for r in range(self.world_size)]


@dataclass
class _Item:
    index: int
    rows: tuple[ManifestRow, ...]
    key: str | None  # the video's feature-cache name (None: no cache)
    video: Video | None  # None when it could not be read, or its features are cached and no teacher needs it
    error: str | None
    cached: bool = False  # its features are in the cache


@dataclass
class _Micro:
    """One rank's videos of a micro-step: their rows, cache keys, and the decoded ones as a batch."""

    rows: list[tuple[ManifestRow, ...]]
    keys: list[str | None]
    decoded: list[int]  # positions (in ``rows``) of the videos in ``videos`` (features to extract)
    videos: VideoBatch | None
    errors: list[str]
    teacher: TeacherBatch | None = None  # every row with its video in context (KL on)


class _TrainVideos(VideoQADataset):
    """Items of a manifest (`VideoQADataset`'s grouping); a video with cached features is not decoded
    unless ``teacher`` (the KL term's teacher needs its pixels)."""

    def __init__(self, rows, preprocessor, *, questions_per_video: int, cache: FeatureCache | None,
                 teacher: bool = False):
        super().__init__(rows, preprocessor, max_questions_per_video=questions_per_video)
        self.cache, self.teacher = cache, teacher

    def __getitem__(self, index: int) -> _Item:
        rows = self.items[index]
        try:
            key = self.cache.video_key(rows[0].video_file) if self.cache is not None else None
            cached = key is not None and self.cache.has(key)
            if cached and not self.teacher:
                return _Item(index, rows, key, None, None, cached=True)
            video = read_video(rows[0].video_file, max_frames=self.preprocessor.max_frames,
                               target_fps=self.preprocessor.fps)
        except (VideoError, OSError) as err:
            return _Item(index, rows, None, None, f"{describe_rows(rows)}: video_path: {err}")
        return _Item(index, rows, key, video, None, cached=cached)


class _Collate:
    """Build the batch of the videos without cached features inside the worker (internalisation
    prompt, pixels) and, with ``teacher``, the KL teacher's rows of every video (pixels reused)."""

    def __init__(self, tokenizer, preprocessor, instruction: str, teacher: bool = False):
        self.tokenizer, self.preprocessor, self.instruction = tokenizer, preprocessor, instruction
        self.teacher = teacher

    def __call__(self, items: list[_Item]) -> _Micro:
        errors = [item.error for item in items if item.error]
        decoded = [j for j, item in enumerate(items) if item.video is not None and not item.cached]
        videos = None
        if decoded:
            videos = build_video_batch([items[j].video for j in decoded], self.instruction, self.tokenizer,
                                       self.preprocessor, pad_token_id=pad_id(self.tokenizer))
        teacher = None
        if self.teacher and not errors:
            pixels: list = [None] * len(items)
            for position, j in enumerate(decoded):
                pixels[j] = videos.pixel_values[position, :len(items[j].video.frames)]
            rows = [(j, row) for j, item in enumerate(items) for row in item.rows]
            teacher = teacher_batch(self.tokenizer, self.preprocessor, [item.video for item in items],
                                    [row.prompt for _, row in rows], [row.target_text for _, row in rows],
                                    [j for j, _ in rows], pad_token_id=pad_id(self.tokenizer), pixels=pixels)
        return _Micro([item.rows for item in items], [item.key for item in items], decoded, videos, errors, teacher)


class _Batches(torch.utils.data.Sampler):
    """This rank's item lists, micro-step after micro-step, from ``start_step`` to ``max_steps``."""

    def __init__(self, order: DataOrder, rank: int, start_step: int, max_steps: int):
        self.order, self.rank, self.start_step, self.max_steps = order, rank, start_step, max_steps

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.order.grad_accum

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.order.grad_accum):
                yield self.order.micro_step(step, micro)[self.rank]


class _AdapterGenerator(nn.Module):
    """The hypernetwork behind a ``forward`` (what DDP wraps): features → combined ``(A, B)``."""

    def __init__(self, hypernet: Frames2LoRA, autocast: bool):
        super().__init__()
        self.hypernet, self.autocast = hypernet, autocast

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.hypernet.generate(features, mask, autocast=self.autocast)
        return out.A, out.B


class _Adapters:
    """What `adapter_loss` calls ``generate`` on: a forward module (DDP-wrapped or not) and α."""

    def __init__(self, forward: nn.Module, alpha: float):
        self.forward, self.alpha = forward, alpha

    def generate(self, features: torch.Tensor, mask: torch.Tensor) -> SimpleNamespace:
        """Combined ``A``, ``B`` and ``alpha`` of each video."""
        A, B = self.forward(features, mask)
        return SimpleNamespace(A=A, B=B, alpha=self.alpha)


@dataclass
class TrainResult:
    """What `train` did: the last step, its loss, the best validation CE and the last checkpoint."""

    step: int
    loss: float | None
    best_val_ce: float | None
    checkpoint: str | None
    resumed_from: str | None


def _read_rows(path: str | None, what: str, data_root: str | None) -> list[ManifestRow]:
    if path is None:
        fail(what, "a JSONL manifest with targets (v2l-fast teacher or v2l-fast world writes one)", "none")
    return read_manifest(path, data_root=data_root, require_targets=True).rows


def _build_hypernet(config: TrainConfig, vlm: VLM) -> Frames2LoRA:
    if config.init_hypernet is not None:
        return load_frames2lora(config.init_hypernet, expect=vlm.model.config)
    torch.manual_seed(config.seed)
    return Frames2LoRA(Frames2LoRAConfig.for_vlm(
        vlm.model.config, rank=config.rank, latent_size=config.latent_size,
        num_latent_queries=config.num_latent_queries, num_blocks=config.num_blocks,
        num_self_attn_per_block=config.num_self_attn_per_block))


class Trainer:
    """One training run of `TrainConfig` on this process (one rank of it under ``torchrun``)."""

    def __init__(self, config: TrainConfig, *, vlm: VLM | None = None, device: torch.device | None = None):
        self.config = config
        self.dist = setup_distributed(device or torch.device("cpu"))
        device = self.dist.device
        self.bf16 = config.bf16 and bf16_matmul_hardware(device) is not None
        if vlm is None:
            if config.vlm is None:
                fail("vlm", "the SmolVLM2 to train for (--vlm HUB_ID_OR_DIR)", "none")
            vlm = load_smolvlm(config.vlm, dtype=torch.bfloat16 if self.bf16 else torch.float32, device=device)
        self.vlm = VLM(vlm.model.to(device), vlm.tokenizer,
                       dataclasses.replace(vlm.preprocessor, max_frames=config.max_frames))
        self.vlm.model.requires_grad_(False).eval()
        self.student_row_ids = cached_student_row_ids(self.vlm.tokenizer)  # questions repeat across videos
        self.train_rows = _read_rows(config.train_manifest, "train_manifest", config.data_root)
        self.val_rows = (read_manifest(config.val_manifest, data_root=config.data_root, require_targets=True).rows
                         if config.val_manifest else [])
        self.cache = None
        if config.feature_cache is not None:
            self.cache = FeatureCache(config.feature_cache,
                                      settings_key(self.vlm.model, self.vlm.preprocessor, config.instruction))
        self.dataset = self._dataset(self.train_rows, teacher=config.kl_weight > 0)
        self.order = DataOrder(len(self.dataset), config.seed, config.videos_per_device, self.dist.world_size,
                               config.grad_accum)
        self.hypernet = _build_hypernet(config, self.vlm).to(device=device, dtype=torch.float32).train()
        module = _AdapterGenerator(self.hypernet, autocast=self.bf16)
        self.optimizer = torch.optim.AdamW(self.hypernet.parameters(), lr=config.lr, betas=config.betas,
                                           eps=config.eps, weight_decay=config.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, config.warmup_steps, config.max_steps)
        self.step, self.best_val_ce, self.last_loss, self.resumed_from = 0, None, None, None
        self._resume()
        self.ddp = None
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        alpha = self.hypernet.config.lora_alpha
        self.train_adapters = _Adapters(self.ddp or module, alpha)
        self.eval_adapters = _Adapters(module, alpha)

    def _dataset(self, rows: list[ManifestRow], *, teacher: bool = False) -> _TrainVideos:
        return _TrainVideos(rows, self.vlm.preprocessor, questions_per_video=self.config.questions_per_video,
                            cache=self.cache, teacher=teacher)

    def _loader(self, dataset: _TrainVideos, batches) -> DataLoader:
        collate = _Collate(self.vlm.tokenizer, self.vlm.preprocessor, self.config.instruction, teacher=dataset.teacher)
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.config.num_workers, collate_fn=collate,
                          multiprocessing_context=worker_start_method(self.config.num_workers),
                          generator=torch.Generator().manual_seed(self.config.seed))

    # ---- checkpoints ------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "data_position": self.step * self.order.global_batch,
                "global_batch_videos": self.order.global_batch, "world_size": self.dist.world_size,
                "best_val_ce": self.best_val_ce, "last_loss": self.last_loss}

    def _contents(self) -> dict:
        return dict(hypernet=self.hypernet, optimizer=self.optimizer, scheduler=self.scheduler, state=self._state(),
                    config_dict=self.config.to_dict())

    def _resume(self) -> None:
        out = self.config.out_dir
        if self.dist.main:
            ckpt.remove_partial_writes(out)
        self._barrier()
        latest = ckpt.latest_checkpoint(out)
        if latest is None:
            self._truncate_metrics(0)
            return
        loaded = ckpt.load_checkpoint(latest, self.hypernet)
        state_file = os.path.join(latest, ckpt.STATE_FILE)
        if loaded.state.get("global_batch_videos") != self.order.global_batch:
            fail(f"{state_file}: global_batch_videos", f"{self.order.global_batch} (videos_per_device × world size × "
                 "grad_accum of this run; keep the global batch to resume exactly)",
                 loaded.state.get("global_batch_videos"))
        with open(os.path.join(latest, ckpt.CONFIG_NAME), encoding="utf-8") as f:
            saved = json.load(f)
        mine = self.config.to_dict()
        for name in RESUME_FIXED:
            if saved.get(name) != mine[name]:
                fail(f"{os.path.join(latest, ckpt.CONFIG_NAME)}: {name}",
                     f"{mine[name]!r} as in this run (start another --out-dir to change it)", repr(saved.get(name)))
        self.optimizer.load_state_dict(loaded.trainer["optimizer"])
        self.scheduler.load_state_dict(loaded.trainer["scheduler"])
        ckpt.set_rng_state(loaded.trainer["rng"])
        self.step, self.best_val_ce = loaded.state["step"], loaded.state.get("best_val_ce")
        self.last_loss, self.resumed_from = loaded.state.get("last_loss"), latest
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps ≤ ``step`` (a resumed run logs the later ones again)."""
        if not self.dist.main:
            return
        path = os.path.join(self.config.out_dir, METRICS_FILE)
        kept = []
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a torn last line of a killed run
                        continue
                    if record.get("step", 0) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        os.makedirs(self.config.out_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def _log(self, record: dict) -> None:
        if self.dist.main:
            with open(os.path.join(self.config.out_dir, METRICS_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    def _all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    # ---- one step -----------------------------------------------------------------------------
    def _features(self, micro: _Micro) -> tuple[torch.Tensor, torch.Tensor]:
        if micro.errors:
            raise VideoError(micro.errors[0])
        per_video: list = [None] * len(micro.rows)
        for j, key in enumerate(micro.keys):
            if j not in micro.decoded:
                per_video[j] = self.cache.load(key)
        if micro.videos is not None:
            features, mask = extract_features(self.vlm.model, micro.videos)
            for position, j in enumerate(micro.decoded):
                per_video[j] = trim(features[position], mask[position])
                if self.cache is not None:
                    self.cache.store(micro.keys[j], *per_video[j])
        device = self.dist.device
        return pad_videos([(f.to(device), m.to(device)) for f, m in per_video])

    def _loss(self, micro: _Micro, adapters: _Adapters) -> tuple[LossTerms, int]:
        """Spec §7's objective of this rank's share of a micro-step (CE, and with a teacher batch
        CE + kl_weight · KL; each a mean over its rows) and its row count."""
        features, mask = self._features(micro)
        prompts = [row.prompt for rows in micro.rows for row in rows]
        targets = [row.target_text for rows in micro.rows for row in rows]
        row_video = [j for j, rows in enumerate(micro.rows) for _ in rows]
        batch = student_batch(self.vlm.tokenizer, prompts, targets, row_video, row_ids=self.student_row_ids)
        teacher = None
        if micro.teacher is not None:
            with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                teacher = teacher_answer_logits(self.vlm.model, micro.teacher)
        with training_autocast(self.dist.device, self.bf16):
            terms = adapter_objective(adapters, self.vlm.model, features, mask, batch, teacher=teacher,
                                      kl_weight=self.config.kl_weight if teacher is not None else 0.0,
                                      kl_temperature=self.config.kl_temperature)
        return terms, len(prompts)

    def _rows_of(self, items: list[int]) -> int:
        return sum(len(self.dataset.items[i]) for i in items)

    def train_step(self, micros) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches of this rank; returns its metrics."""
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        logged = [0.0, 0.0, 0.0]  # loss, ce, kl: each the global batch's mean over rows
        for micro_index in range(self.config.grad_accum):
            micro = next(micros)
            global_rows = sum(self._rows_of(items) for items in self.order.micro_step(self.step, micro_index))
            last = micro_index == self.config.grad_accum - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                terms, rows = self._loss(micro, self.train_adapters)
                share = rows / global_rows / self.config.grad_accum
                (terms.loss * share * self.dist.world_size).backward()
            for k, value in enumerate((terms.loss, terms.ce, terms.kl)):
                if value is not None:
                    logged[k] += float(value.detach()) * share
        grad_norm = None
        if self.config.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.hypernet.parameters(), self.config.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_loss, ce, kl = self._all_sum(logged)
        kl_terms = {"ce": ce, "kl": kl} if self.config.kl_weight > 0 else {}
        return {"step": self.step, "loss": self.last_loss, **kl_terms, "lr": lr, "grad_norm": grad_norm,
                "epoch": (self.step * self.order.global_batch) / len(self.dataset),
                "seconds": round(time.perf_counter() - started, 4)}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Validation CE: spec §7's CE per row, averaged over the (first ``eval_videos``) validation items."""
        if not self.val_rows:
            return None
        dataset = self._dataset(self.val_rows)
        count = len(dataset) if self.config.eval_videos is None else min(self.config.eval_videos, len(dataset))
        mine = list(range(self.dist.rank, count, self.dist.world_size))
        size = self.config.videos_per_device
        batches = [mine[i:i + size] for i in range(0, len(mine), size)]
        total, rows = 0.0, 0
        self.hypernet.eval()
        for micro in self._loader(dataset, batches):
            terms, n = self._loss(micro, self.eval_adapters)
            total, rows = total + float(terms.ce) * n, rows + n
        self.hypernet.train()
        total, rows = self._all_sum([total, rows])
        return total / rows

    @flush_denormals()
    def run(self) -> TrainResult:
        """Train from the current step to ``max_steps``: log, evaluate, save; return the summary.

        CPU math flushes denormals to zero meanwhile (`flush_denormals`: a trained hypernetwork's
        step ran 2× slower without)."""
        cfg, out = self.config, self.config.out_dir
        last_saved = self.resumed_from
        loader = self._loader(self.dataset, _Batches(self.order, self.dist.rank, self.step, cfg.max_steps))
        micros = iter(loader)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not (cfg.progress and self.dist.main))
        while self.step < cfg.max_steps:
            metrics = self.train_step(micros)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log(metrics)
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                val_ce = self.evaluate()
                if val_ce is not None:
                    self._log({"step": self.step, "val_ce": val_ce})
                    if self.best_val_ce is None or val_ce < self.best_val_ce:
                        self.best_val_ce = val_ce
                        if self.dist.main:
                            ckpt.save_best(out, **self._contents())
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                if self.dist.main:
                    last_saved = ckpt.save_step(out, self.step, cfg.keep_last, **self._contents())
                self._barrier()
        bar.close()
        return TrainResult(self.step, self.last_loss, self.best_val_ce, last_saved, self.resumed_from)

    def close(self) -> None:
        """Leave the process group (when this run joined one).

        DDP goes first, while the group is still registered. Its reducer holds a reference to the
        group; were that the last one, the group's destructor would run from the reducer's, which
        keeps the GIL while it joins gloo's worker threads, and a worker still freeing the tensors
        of a finished collective waits for the GIL: a deadlock at exit (gdb: ``~Reducer`` →
        ``~ProcessGroupGloo`` → ``thread::join`` against ``~AsyncWork`` → ``decref_pyobject`` →
        ``take_gil``; 2 of 70 two-process CPU runs hung). Destroyed from its own binding, in
        ``destroy_process_group``, the group releases the GIL first.
        """
        if self.dist.world_size > 1 and dist.is_initialized():
            ddp = weakref.ref(self.ddp)
            self.ddp = self.train_adapters = None
            gc.collect()  # in case a reference cycle (hooks, closures) still holds it
            if ddp() is not None:
                raise RuntimeError("trainer: expected DDP freed before the process group is destroyed (its reducer "
                                   "would destroy the group holding the GIL), got a live reference")
            dist.destroy_process_group()


def train(config: TrainConfig, *, vlm: VLM | None = None, device: torch.device | None = None) -> TrainResult:
    """Run (or resume, when ``config.out_dir`` holds a checkpoint) a training run; see the module docstring.

    Args:
        config: the run's settings.
        vlm: the frozen VLM (None: ``load_smolvlm(config.vlm)``, in bf16 where training autocasts
            to bf16 (``config.bf16`` and `v2l_fast.precision.bf16_matmul_hardware`), else fp32).
        device: this process's device (None: the CPU; under ``torchrun`` on CUDA, ``cuda:LOCAL_RANK``).
    """
    trainer = Trainer(config, vlm=vlm, device=device)
    try:
        return trainer.run()
    finally:
        trainer.close()
