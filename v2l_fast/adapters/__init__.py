"""Adapters: the object `internalize` returns and its file (`core`), the adapter store and
device pool of the serving engine (`store`), the bias fold (`fold`) and PEFT export (`peft`)."""

from v2l_fast.adapters.core import FORMAT, Adapters, base_fingerprint

__all__ = ["FORMAT", "Adapters", "base_fingerprint"]
