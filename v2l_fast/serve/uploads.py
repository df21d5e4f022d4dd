"""Request bodies read under the server's limits, and uploaded videos checked against them.

`read_json` (a JSON object, bounded), `spool_body` (a body streamed into a file, bounded),
`split_multipart` and `receive_upload` (a ``multipart/form-data`` or raw upload, on disk),
`upload_folder` (a temporary folder for one upload) and `probe_video` (a video's frames and
pixels as its container states them, before anything is decoded). No upload is ever held in
memory whole: bodies go to disk as they arrive (413 as soon as one passes its limit) and
multipart parts are cut from an mmap of that file. Refusals are `ApiError`s (`limits`).
"""

from __future__ import annotations

import email.message
import email.utils
import json
import mmap
import os
import shutil
import tempfile
from contextlib import asynccontextmanager

import anyio
from fastapi import Request

from v2l_fast.serve.limits import ApiError, ServerLimits, too_large

__all__ = ["probe_video", "read_json", "receive_upload", "spool_body", "split_multipart", "upload_folder"]

_CHUNK = 1 << 20  # upload bytes written to disk per worker-thread call


def _declared_length(request: Request, limit: int, what: str) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise ApiError(400, f"content-length: expected a number of bytes, got {declared[:40]!r}")
    if int(declared) > limit:
        raise ApiError(413, f"{what}: expected at most {limit} bytes, got {declared}", code="request_too_large")


async def read_json(request: Request, limit: int) -> dict:
    """The JSON object of the request body, reading no more than ``limit`` bytes (413 beyond)."""
    _declared_length(request, limit, "request body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit, "request body")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"body: expected JSON, got text that does not parse: {err}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(value).__name__}", code="invalid_json")
    return value


async def spool_body(request: Request, path: str, limit: int) -> int:
    """Stream the request body into the file ``path``; stop reading past ``limit`` bytes (413).
    Returns the bytes written; an empty body is refused (400)."""
    _declared_length(request, limit, "upload")
    size, pending = 0, bytearray()
    with open(path, "wb") as handle:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit, "upload")
            pending += chunk
            if len(pending) >= _CHUNK:
                await anyio.to_thread.run_sync(handle.write, bytes(pending))
                pending.clear()
        handle.write(pending)
    if size == 0:
        raise ApiError(400, "body: expected the uploaded file, got an empty body", param="file")
    return size


def _header_param(value: str, header: str, name: str) -> str | None:
    message = email.message.Message()
    message[header] = value
    found = message.get_param(name, header=header)
    return email.utils.collapse_rfc2231_value(found) if found is not None else None


def split_multipart(path: str, boundary: str, folder: str) -> tuple[dict[str, str], dict[str, str]]:
    """Parse the ``multipart/form-data`` body in file ``path``: returns (text fields, file fields
    as paths of their bytes copied into ``folder``). Malformed bodies raise `ApiError` 400."""
    def malformed(why: str) -> ApiError:
        return ApiError(400, f"body: expected multipart/form-data, got a body that {why}", code="invalid_multipart")

    fields, files = {}, {}
    delimiter = b"--" + boundary.encode("latin-1")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = data.find(delimiter)
        if at < 0:
            raise malformed("lacks the boundary")
        while True:
            at += len(delimiter)
            if data[at:at + 2] == b"--":
                break
            if data[at:at + 2] != b"\r\n":
                raise malformed("has a boundary line not ended by CRLF")
            head_end = data.find(b"\r\n\r\n", at + 2, at + 2 + 16384)
            if head_end < 0:
                raise malformed("has a part without headers ending in 16 KiB")
            headers = {}
            for line in data[at + 2:head_end].decode("utf-8", "replace").split("\r\n"):
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            start = head_end + 4
            end = data.find(b"\r\n" + delimiter, start)
            if end < 0:
                raise malformed("has a part without its closing boundary")
            disposition = headers.get("content-disposition", "")
            name = _header_param(disposition, "content-disposition", "name")
            if name is None:
                raise malformed("has a part without a name")
            if _header_param(disposition, "content-disposition", "filename") is not None:
                target = os.path.join(folder, f"part-{len(files)}")
                with open(target, "wb") as out:
                    for offset in range(start, end, _CHUNK):
                        out.write(data[offset:min(offset + _CHUNK, end)])
                files[name] = target
            else:
                if end - start > 4096:
                    raise malformed(f"has a text field {name!r} over 4096 bytes")
                fields[name] = data[start:end].decode("utf-8", "replace")
            at = end + 2
    return fields, files


@asynccontextmanager
async def upload_folder():
    """A new temporary folder for one upload's files, removed (in a worker thread) on exit."""
    folder = tempfile.mkdtemp(prefix="v2l-fast-upload-")
    try:
        yield folder
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, folder, True)


async def receive_upload(request: Request, folder: str, limit: int) -> tuple[dict[str, str], str]:
    """The uploaded file (a path in ``folder``) and the text fields: a ``multipart/form-data``
    body with a ``file`` part (text parts are fields), or else the raw body as the file;
    query parameters are fields too (form fields win)."""
    body = os.path.join(folder, "body")
    await spool_body(request, body, limit)
    fields = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/"):
        return fields, body
    boundary = _header_param(content_type, "content-type", "boundary")
    if not boundary:
        raise ApiError(400, "content-type: expected multipart/form-data with a boundary, got none",
                       code="invalid_multipart")
    form, files = await anyio.to_thread.run_sync(split_multipart, body, boundary, folder)
    fields.update(form)
    path = files.get("file", files.get("video"))
    if path is None:
        raise ApiError(400, f"file: expected a file part named 'file', got parts {sorted(form) + sorted(files)}",
                       param="file")
    return fields, path


def probe_video(path: str, limits: ServerLimits) -> None:
    """Refuse (`ApiError` 400) a file that is no video PyAV can open, or whose container states
    more frames or pixels than ``limits`` allow, before anything is decoded."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ApiError(400, "file: expected a video, got a file without a video stream", param="file",
                               code="invalid_video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
            frames = stream.frames
            if not frames and container.duration and stream.average_rate:
                frames = int(container.duration / 1e6 * float(stream.average_rate)) + 1
    except av.error.FFmpegError as err:
        raise ApiError(400, f"file: expected a video PyAV can read, got one it cannot: {err}", param="file",
                       code="invalid_video") from None
    if width * height > limits.max_video_pixels:
        raise ApiError(400, f"file: expected frames of at most {limits.max_video_pixels} pixels, got "
                       f"{width}x{height}", param="file", code="video_too_large")
    if frames > limits.max_video_frames:
        raise ApiError(400, f"file: expected a video of at most {limits.max_video_frames} frames, got about {frames}",
                       param="file", code="video_too_long")
