"""Serving: a continuous-batching engine over many adapters (`engine`), its packed decoder
(`decoder`), sampling and stop rules (`sampling`), and the OpenAI-compatible HTTP server
(`server`: routes and streaming; `limits`: limits and the JSON error format; `uploads`: request
bodies under limits; `internalizer`: videos uploaded to the server into adapters)."""

from v2l_fast.serve.engine import Completion, Engine, EngineFull, RequestHandle, StreamEvent
from v2l_fast.serve.sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineFull", "RequestHandle", "SamplingParams", "StreamEvent"]
