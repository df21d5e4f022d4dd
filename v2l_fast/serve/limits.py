"""What the server allows one request, and how it says no.

`ServerLimits` (request sizes, video sizes, tokens, requests in flight), the OpenAI-style
`ApiError` (HTTP status and ``{"error": {"message", "type", "param", "code"}}``), `bad_input`
(the stack's one-line ``name: expected …, got …`` ValueErrors as an `ApiError`), `too_large`
(413) and the bounded in-flight `Counter` (429). They are apart from the app (`server`) so
that the body readers (`uploads`) refuse with the same limits and error format; nothing here
needs FastAPI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from v2l_fast.errors import fail

__all__ = ["ApiError", "Counter", "ServerLimits", "bad_input", "too_large"]


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server; beyond them it answers 4xx instead of trying.

    Attributes:
        max_upload_bytes: body of an adapter upload (a video or an adapters file): 413 beyond.
        max_request_bytes: body of a JSON request (a chat completion): 413 beyond.
        max_frames: frames sampled from an uploaded video (None: the VLM's preprocessor
            ``max_frames``); a request asking for more is refused.
        max_video_frames: frames the container of an uploaded video may hold (decoding cost).
        max_video_pixels: width × height of an uploaded video's frames.
        max_prompt_tokens: tokens of a chat's prompt after the chat template (the engine's
            ``max_len`` bounds prompt + answer as well).
        max_tokens: tokens one answer may ask for; also the default when a request names none
            (then at most what fits the engine's ``max_len``).
        max_concurrent: chat requests in flight at once (waiting, running or streaming): 429
            beyond, never a wait. The engine's ``max_queue`` bounds its queue (429 as well).
        max_internalizations: adapter uploads in flight at once (uploading, waiting for the
            internalization lock, or internalizing): 429 beyond.
    """

    max_upload_bytes: int = 256 << 20
    max_request_bytes: int = 1 << 20
    max_frames: int | None = None
    max_video_frames: int = 100_000
    max_video_pixels: int = 3840 * 2160
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024
    max_concurrent: int = 256
    max_internalizations: int = 4

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_request_bytes", "max_video_frames", "max_video_pixels",
                     "max_prompt_tokens", "max_tokens", "max_concurrent", "max_internalizations"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                fail(name, "an int >= 1", repr(value))
        if self.max_frames is not None and (type(self.max_frames) is not int or self.max_frames < 1):
            fail("max_frames", "an int >= 1 or None", repr(self.max_frames))


class ApiError(Exception):
    """A refused request: HTTP ``status`` and the OpenAI-style error body's fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        if status == 429 and type is None:
            self.type = "rate_limit_error"

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_PARAM = re.compile(r"^([A-Za-z_][\w.\[\]-]*): expected ")


def bad_input(err: Exception, status: int = 400, code: str | None = None) -> ApiError:
    """An `ApiError` of a ValueError of the stack (``name: expected …, got …``), one line, its
    argument as ``param``."""
    message = " ".join(str(err).split()) or type(err).__name__
    match = _PARAM.match(message)
    return ApiError(status, message, param=match.group(1) if match else None, code=code)


def too_large(limit: int, what: str) -> ApiError:
    """413: ``what`` is over ``limit`` bytes."""
    return ApiError(413, f"{what}: expected at most {limit} bytes, got more", code="request_too_large")


class Counter:
    """In-flight requests of one kind, bounded; touched from the event loop only."""

    def __init__(self, limit: int, what: str, code: str):
        self.limit, self.what, self.code, self.value = limit, what, code, 0

    def acquire(self) -> None:
        if self.value >= self.limit:
            raise ApiError(429, f"{self.what}: at most {self.limit} at once; retry later", code=self.code)
        self.value += 1

    def release(self) -> None:
        self.value -= 1
