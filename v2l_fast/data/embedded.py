"""The embedded default: a trained toy VLM, its hypernetwork and sample clips, shipped in the package.

``v2l_fast/assets/toy/`` holds what one ``v2l-fast replicate`` run produced (`write_embedded`
copies it there):

* ``vlm/`` — the toy SmolVLM2 (a `load_smolvlm` directory: config, weights, word-level
  tokenizer, preprocessor), trained from scratch on the synthetic world with the video in
  context;
* ``hypernet/`` — the Frames2LoRA trained on that VLM's teacher targets (a `load_frames2lora`
  directory);
* ``clips/`` — a few held-out clips of the world and ``clips.jsonl``, their question rows with
  the ground truth (the authors' manifest format);
* ``report.json`` — the run's held-out table and settings (where the numbers came from).

`embedded_default` returns the paths, or fails in one line when this install lacks them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass

from v2l_fast.data.manifest import ManifestRow, read_manifest, write_manifest
from v2l_fast.errors import fail

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy")
CLIPS_MANIFEST = "clips.jsonl"


@dataclass(frozen=True)
class EmbeddedDefault:
    """Paths of the embedded default and its sample clips' question rows (ground truth in ``target_text``)."""

    vlm: str
    hypernet: str
    clips: tuple[tuple[str, tuple[ManifestRow, ...]], ...]  # (video file, its question rows), in order
    report: dict


def embedded_default(root: str | os.PathLike | None = None) -> EmbeddedDefault:
    """The embedded default under ``root`` (None: `EMBEDDED_DIR`, the package's ``assets/toy``), checked complete."""
    root = os.fspath(EMBEDDED_DIR if root is None else root)
    needed = [os.path.join(root, name) for name in ("vlm/config.json", "vlm/model.safetensors",
                                                    "hypernet/config.json", f"clips/{CLIPS_MANIFEST}", "report.json")]
    missing = [path for path in needed if not os.path.isfile(path)]
    if missing:
        fail("embedded default", f"the trained toy model in {root} (written by `v2l-fast replicate` and "
             "v2l_fast.data.embedded.write_embedded)", f"an install without {os.path.relpath(missing[0], root)}")
    rows = read_manifest(os.path.join(root, "clips", CLIPS_MANIFEST), require_targets=True).rows
    clips: dict[str, list[ManifestRow]] = {}
    for row in rows:
        clips.setdefault(row.video_file, []).append(row)
    with open(os.path.join(root, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return EmbeddedDefault(os.path.join(root, "vlm"), os.path.join(root, "hypernet"),
                           tuple((path, tuple(group)) for path, group in clips.items()), report)


def write_embedded(vlm_dir: str | os.PathLike, hypernet_dir: str | os.PathLike, heldout_manifest: str | os.PathLike,
                   report: dict, dest: str | os.PathLike | None = None, *, num_clips: int = 4) -> str:
    """Copy a replication run's models, the first ``num_clips`` clips of ``heldout_manifest`` (with
    their question rows) and ``report`` (without the per-question records) into ``dest``.

    ``dest`` is replaced as a whole (written next to it, then renamed), so a failed copy never
    leaves a half-written default. ``dest`` None: `EMBEDDED_DIR`.
    """
    dest = os.fspath(EMBEDDED_DIR if dest is None else dest)
    rows = [row for row in read_manifest(heldout_manifest, require_targets=True).rows if row.task_type == "qa"]
    files = list(dict.fromkeys(row.video_file for row in rows))[:num_clips]
    if not files:
        fail("heldout_manifest", "question rows of at least one clip", repr(os.fspath(heldout_manifest)))
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "clips"))
    for name, src in (("vlm", vlm_dir), ("hypernet", hypernet_dir)):
        shutil.copytree(src, os.path.join(tmp, name), ignore=shutil.ignore_patterns("*.tmp"))
    kept = []
    for path in files:
        shutil.copy2(path, os.path.join(tmp, "clips", os.path.basename(path)))
        kept += [dataclasses.replace(row, video_path=os.path.basename(path)) for row in rows if row.video_file == path]
    write_manifest(kept, os.path.join(tmp, "clips", CLIPS_MANIFEST))
    with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in report.items() if k != "questions"}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
