"""JSONL manifests in the Frames2LoRA authors' format, read with validation and written atomically.

One JSON object per line (blank lines are ignored), the fields of the authors'
``ctx_to_lora.data.video_manifest``:

=================  ==========================  ==========================================
field              type                        when absent
=================  ==========================  ==========================================
``id``             non-empty str, unique       required
``video_path``     non-empty str               required; relative paths are resolved against
                                               the data root (default: the manifest's folder)
``prompt``         non-empty str               required
``target_text``    str                         ``""`` (a manifest the teacher will fill);
                                               required non-empty with ``require_targets``
``task_type``      str                         ``"caption"``
``dataset``        str                         ``"unknown"``
``split``          str or null                 null
``metadata``       object                      ``{}``
``clip_start_sec``, ``clip_end_sec``  number or null  null (informational: the clip file is
                                               already cut, as in the authors' data)
=================  ==========================  ==========================================

Any other key is refused (the error names it): a misspelt ``target_txt`` would otherwise
silently train on empty targets. Keep extra information under ``metadata``.

A bad row is one line on the error: ``FILE:LINE: FIELD: expected X, got Y``. With
``skip_bad_rows`` the reader keeps the good rows and returns the bad ones with those messages.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

from v2l_fast.errors import fail

REQUIRED = ("id", "video_path", "prompt")
FIELDS = ("id", "video_path", "task_type", "prompt", "target_text", "dataset", "split", "metadata",
          "clip_start_sec", "clip_end_sec")
ROW_FIELD = "<row>"  # the field named when a line is not a JSON object at all


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row; ``video_file`` is ``video_path`` resolved against the data root.

    ``source`` (``FILE:LINE``) and ``video_file`` are not written back to a manifest.
    """

    id: str
    video_path: str
    prompt: str
    target_text: str = ""
    task_type: str = "caption"
    dataset: str = "unknown"
    split: str | None = None
    metadata: dict = field(default_factory=dict)
    clip_start_sec: float | None = None
    clip_end_sec: float | None = None
    video_file: str = field(default="", compare=False)
    source: str = field(default="", compare=False)

    def to_json(self) -> dict:
        """The row as the manifest stores it (authors' key order; clip times only when set)."""
        out = {name: getattr(self, name) for name in FIELDS}
        for name in ("clip_start_sec", "clip_end_sec"):
            if out[name] is None:
                del out[name]
        return out


@dataclass(frozen=True)
class BadRow:
    """A row refused by `read_manifest`: where it is, which field, and why."""

    path: str
    line: int
    field: str
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: expected {self.expected}, got {self.got}"


class ManifestRead(NamedTuple):
    """What `read_manifest` returns: the good rows in file order and the refused ones."""

    rows: list[ManifestRow]
    bad: list[BadRow]


class _Refused(Exception):
    def __init__(self, field: str, expected: str, got: str):
        super().__init__(field)
        self.field, self.expected, self.got = field, expected, got


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _string(obj: dict, name: str, *, required: bool = False, non_empty: bool = False, default=""):
    if name not in obj:
        if required:
            raise _Refused(name, "a field present in every row", "a row without it")
        return default
    value = obj[name]
    if not isinstance(value, str) or (non_empty and not value.strip()):
        kind = "a non-empty string" if non_empty else "a string"
        raise _Refused(name, kind, _short(value))
    return value


def _seconds(obj: dict, name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _Refused(name, "a number of seconds >= 0 or null", _short(value))
    return float(value)


def _parse_row(obj, *, data_root: str, require_targets: bool = False, source: str = "") -> ManifestRow:
    """Validate one decoded JSON line and build its `ManifestRow` (raises ``_Refused``)."""
    if not isinstance(obj, dict):
        raise _Refused(ROW_FIELD, "a JSON object", f"a JSON {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise _Refused(unknown[0], f"only the manifest fields {list(FIELDS)} (put extra data under metadata)",
                       "an unknown field")
    row_id = _string(obj, "id", required=True, non_empty=True)
    video_path = _string(obj, "video_path", required=True, non_empty=True)
    prompt = _string(obj, "prompt", required=True, non_empty=True)
    target = _string(obj, "target_text", required=require_targets, non_empty=require_targets)
    split = obj.get("split")
    if split is not None and not isinstance(split, str):
        raise _Refused("split", "a string or null", _short(split))
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _Refused("metadata", "a JSON object", _short(metadata))
    start, end = _seconds(obj, "clip_start_sec"), _seconds(obj, "clip_end_sec")
    if start is not None and end is not None and end < start:
        raise _Refused("clip_end_sec", f"a time after clip_start_sec ({start:g})", _short(end))
    return ManifestRow(id=row_id, video_path=video_path, prompt=prompt, target_text=target,
                       task_type=_string(obj, "task_type", default="caption"),
                       dataset=_string(obj, "dataset", default="unknown"), split=split, metadata=dict(metadata),
                       clip_start_sec=start, clip_end_sec=end,
                       video_file=os.path.normpath(os.path.join(data_root, os.path.expanduser(video_path))),
                       source=source)


def read_manifest(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                  skip_bad_rows: bool = False, require_targets: bool = False,
                  check_videos: bool = True) -> ManifestRead:
    """Read and validate a JSONL manifest.

    Args:
        path: the manifest file.
        data_root: folder that relative ``video_path`` values are resolved against (None: the
            manifest's own folder).
        skip_bad_rows: keep going past bad rows, returning them in ``bad``; otherwise the
            first bad row raises ``ValueError("FILE:LINE: FIELD: expected X, got Y")``.
        require_targets: refuse rows without a non-empty ``target_text`` (training data).
        check_videos: refuse rows whose video file does not exist.

    Returns:
        `ManifestRead` ``(rows, bad)``; a repeated ``id`` is a bad row (the first one is kept).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        fail("manifest", "an existing JSONL file", f"{path!r}, which was not found")
    root = os.path.dirname(os.path.abspath(path)) if data_root is None else os.fspath(data_root)
    if not os.path.isdir(root):
        fail("data_root", "an existing folder", repr(root))
    rows, bad, first_line = [], [], {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                row = _parse_line(raw, root, require_targets, f"{path}:{number}")
                if row is None:
                    continue
                if row.id in first_line:
                    raise _Refused("id", "an id used by no other row",
                                   f"{_short(row.id)}, already the id of line {first_line[row.id]}")
                if check_videos and not os.path.isfile(row.video_file):
                    written = json.dumps(row.video_path, ensure_ascii=False)
                    raise _Refused("video_path", "an existing video file",
                                   f"{written} (resolved to {row.video_file!r}, which was not found)")
            except _Refused as refused:
                reason = BadRow(path, number, refused.field, refused.expected, refused.got)
                if not skip_bad_rows:
                    raise ValueError(str(reason)) from None
                bad.append(reason)
                continue
            first_line[row.id] = number
            rows.append(row)
    if not rows and not bad:
        fail("manifest", "at least one row", f"{path!r}, which has none")
    return ManifestRead(rows, bad)


def _parse_line(raw: bytes, root: str, require_targets: bool, source: str) -> ManifestRow | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Refused(ROW_FIELD, "UTF-8 text", f"an undecodable byte at column {err.start + 1}") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise _Refused(ROW_FIELD, "one JSON object per line", f"invalid JSON ({err.msg} at column {err.colno})") \
            from None
    return _parse_row(obj, data_root=root, require_targets=require_targets, source=source)


def row_line(row: ManifestRow) -> str:
    """The row as one manifest line (JSON, non-ASCII kept, newline at the end)."""
    return json.dumps(row.to_json(), ensure_ascii=False) + "\n"


def write_manifest(rows, path: str | os.PathLike) -> None:
    """Write ``rows`` (`ManifestRow`) to ``path`` atomically: a temporary file in the same folder,
    flushed and fsynced, then renamed over ``path``; a crash leaves the old file or the new one."""
    path = os.fspath(path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fail("manifest_out", "a file in an existing folder", f"{path!r}, whose folder does not exist")
    write_text_atomic(path, "".join(row_line(row) for row in rows))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temporary file in the same folder, flushed
    and fsynced, then renamed over ``path``; a crash leaves the old file or the new one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def fsync_folder(folder: str) -> None:
    """Make a rename or a new file in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
