"""Adapters by id for the serving engine: a store (on disk and/or in memory) and a device pool.

`AdapterStore` keeps per-video adapters under ids: one ``<id>.safetensors`` file each under a
folder, written atomically, or in memory only. `AdapterPool` keeps the most recently used of
them on the device, stacked the way `v2l_fast.ops.lora_sgmv` reads a 4-D pool: per slot
``A [L, max_rank, I]``, ``B [L, max_rank, O]`` and its rank in ``ranks``, so adapters of
different ranks share one batch. The engine serves a request like this::

    key = (adapter_id, store.version(adapter_id))        # the version first, then the load
    slot = pool.acquire(key, lambda: store.get(adapter_id).without_bias())
    ...  lora_sgmv(x, pool.A, pool.B, seg_indptr, seg_adapter (slots), ranks=pool.ranks,
                   layer=l, scaling=pool.scaling)
    pool.release(slot)

Reading the version before loading means a slot never holds older weights than its key says:
a replaced adapter gets a new key, and its old slot ages out (or is dropped with `discard`).

Threads: both classes lock their own bookkeeping, so HTTP handlers may put/delete/get while
the engine thread acquires and releases. The pool's tensors are written only in `acquire`,
and only into a slot no one holds, on the current CUDA stream: a batch that reads pinned
slots on that stream never sees a half-copied adapter.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from v2l_fast.adapters.core import Adapters
from v2l_fast.data.manifest import fsync_folder
from v2l_fast.errors import fail

__all__ = ["AdapterNotFound", "AdapterPool", "AdapterStore", "PoolExhausted", "check_adapter_id"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ID_RULE = "1 to 128 characters from A-Z a-z 0-9 . _ - that start with a letter or digit and hold no '..'"
_SUFFIX = ".safetensors"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}… ({len(text)} characters)"


def check_adapter_id(adapter_id: object) -> str:
    """Return ``adapter_id`` if it is a valid adapter id, else raise ValueError
    ``adapter_id: expected 1 to 128 characters from A-Z a-z 0-9 . _ - ..., got '../x'``.

    The rule leaves no room for a path: no separator, no leading dot, no ``..``; so
    ``<root>/<id>.safetensors`` is always a file directly inside root.
    """
    if not isinstance(adapter_id, str) or not _ID.fullmatch(adapter_id) or ".." in adapter_id:
        fail("adapter_id", _ID_RULE, _short(adapter_id))
    return adapter_id


class AdapterNotFound(ValueError):
    """No adapter is stored under this id (an HTTP server answers 404)."""

    def __init__(self, adapter_id: str):
        super().__init__(f"adapter_id: expected the id of a stored adapter, got {_short(adapter_id)} (no such adapter)")
        self.adapter_id = adapter_id


class PoolExhausted(RuntimeError):
    """Every slot of an `AdapterPool` is pinned by a running request (an HTTP server answers
    429 or 503: retry when requests finish)."""


class AdapterStore:
    """Adapters by id: one ``<id>.safetensors`` file each under ``root`` (atomic writes: a crash
    never leaves a half-written adapter, a reader never sees one), and/or in memory (tensors a
    user hands over, never written to disk).

    Args:
        root: folder of the adapter files (created if missing); None keeps everything in memory.
        base: fingerprint (`v2l_fast.adapters.base_fingerprint`) every adapter must fit,
            checked on `put` and on `get` (`Adapters.check_fingerprint`: dimensions and the
            ``down_proj`` hash; the name is informative only). None checks nothing.

    One store per root: versions are this object's counters, and other writers to the folder
    are not seen by `version`. Thread-safe: puts and deletes are serialised by a lock; gets
    read files outside it (a rename is atomic, so a get sees the old file or the new one).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, base: dict | None = None):
        if base is not None and not isinstance(base, dict):
            fail("base", "a base-model fingerprint dict or None", type(base).__name__)
        self.root = None if root is None else os.path.abspath(os.fspath(root))
        if self.root is not None:
            os.makedirs(self.root, exist_ok=True)
        self.base = base
        self._memory: dict[str, Adapters] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.RLock()

    def _bump(self, adapter_id: str) -> None:
        self._versions[adapter_id] = self._versions.get(adapter_id, 0) + 1

    def _path(self, adapter_id: str) -> str | None:
        return None if self.root is None else os.path.join(self.root, adapter_id + _SUFFIX)

    def _check(self, adapter_id: str, adapters: Adapters) -> None:
        if self.base is not None:
            adapters.check_fingerprint(self.base, name=f"adapter {adapter_id!r}")

    def put(self, adapter_id: str, adapters: Adapters, *, persist: bool = True) -> None:
        """Store ``adapters`` (one video: n == 1) under ``adapter_id``, replacing what was there.

        With ``persist`` and a root, the file is written atomically (temporary file, fsync,
        rename, folder fsync) and nothing is kept in memory; otherwise a CPU copy is kept in
        memory and nothing is written, and a file of the same id is removed (it would bring
        the replaced adapter back after a restart). On any error the old adapter stays.
        """
        check_adapter_id(adapter_id)
        if not isinstance(adapters, Adapters):
            fail("adapters", "an Adapters", type(adapters).__name__)
        if len(adapters) != 1:
            fail("adapters", "the adapters of one video (n == 1; select one with adapters[i])", f"n = {len(adapters)}")
        self._check(adapter_id, adapters)
        path = self._path(adapter_id)
        with self._lock:
            if persist and path is not None:
                _save_atomic(adapters, path)
                self._memory.pop(adapter_id, None)
            else:
                copy = Adapters(adapters.A.detach().to("cpu", copy=True), adapters.B.detach().to("cpu", copy=True),
                                float(adapters.alpha), dict(adapters.base), adapters.bias_rank)
                if path is not None and os.path.exists(path):
                    os.remove(path)
                    fsync_folder(self.root)
                self._memory[adapter_id] = copy
            self._bump(adapter_id)

    def get(self, adapter_id: str) -> Adapters:
        """The adapters stored under ``adapter_id``, on the CPU; `AdapterNotFound` when none.

        In-memory adapters are returned as stored (shared tensors: do not modify them). A
        file that exists but does not hold valid adapters, or adapters that no longer fit the
        store's base, raise ValueError.
        """
        check_adapter_id(adapter_id)
        with self._lock:
            if adapter_id in self._memory:
                return self._memory[adapter_id]
        path = self._path(adapter_id)
        if path is None:
            raise AdapterNotFound(adapter_id)
        try:
            adapters = Adapters.load(path)
        except ValueError:
            if not os.path.exists(path):  # never there, or deleted meanwhile
                raise AdapterNotFound(adapter_id) from None
            raise
        self._check(adapter_id, adapters)
        return adapters

    def version(self, adapter_id: str) -> int:
        """A number that goes up by one on every `put` and `delete` of ``adapter_id`` (0 if
        neither happened in this store's life, e.g. a file from an earlier run).

        Key device copies by ``(adapter_id, version)``, reading the version before `get`, and a
        replaced adapter is never served from a stale copy.
        """
        check_adapter_id(adapter_id)
        with self._lock:
            return self._versions.get(adapter_id, 0)

    def delete(self, adapter_id: str) -> bool:
        """Remove the adapter (memory and file); True if there was one."""
        check_adapter_id(adapter_id)
        path = self._path(adapter_id)
        with self._lock:
            found = self._memory.pop(adapter_id, None) is not None
            if path is not None:
                try:
                    os.remove(path)
                    found = True
                    fsync_folder(self.root)
                except FileNotFoundError:
                    pass
            if found:
                self._bump(adapter_id)
            return found

    def ids(self) -> list[str]:
        """Sorted ids of every stored adapter (memory and files; temporary files ignored)."""
        with self._lock:
            found = set(self._memory)
            if self.root is not None:
                for name in os.listdir(self.root):
                    stem = name[:-len(_SUFFIX)]
                    if name.endswith(_SUFFIX) and _ID.fullmatch(stem) and ".." not in stem:
                        found.add(stem)
        return sorted(found)

    def __contains__(self, adapter_id: object) -> bool:
        """Whether an adapter is stored under ``adapter_id`` (False for an invalid id)."""
        try:
            check_adapter_id(adapter_id)
        except ValueError:
            return False
        with self._lock:
            if adapter_id in self._memory:
                return True
        path = self._path(adapter_id)
        return path is not None and os.path.isfile(path)

    def __len__(self) -> int:
        """How many adapters are stored."""
        return len(self.ids())


def _save_atomic(adapters: Adapters, path: str) -> None:
    """`Adapters.save` to ``path`` atomically: a temporary file in the same folder (a dot name
    that `AdapterStore.ids` ignores), fsynced, renamed over ``path``, then the folder fsynced.
    A crash leaves the old file or the new one, at worst plus a stray temporary file."""
    folder, name = os.path.split(path)
    # A unique name: concurrent writers (threads, processes) never share a temporary file.
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        adapters.save(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_folder(folder)


class AdapterPool:
    """Device-resident adapters with LRU eviction under a memory budget.

    ``capacity`` slots (``budget_bytes`` // bytes of one slot's A and B rows) of
    ``A [capacity, L, max_rank, I]``, ``B [capacity, L, max_rank, O]`` and
    ``ranks [capacity]`` (int64; 0 for an empty slot), ready for `v2l_fast.ops.lora_sgmv`
    with ``ranks=pool.ranks, layer=l, scaling=pool.scaling``. A slot holds one adapter under
    a key (any hashable; the engine uses ``(id, version)``); rows past its rank are zero and
    never read by the op.

    `acquire` pins a slot (a reference count) for the life of a request and `release` unpins
    it; only unpinned slots are evicted, least recently acquired or released first.

    One LoRA scale serves the pool: ``scaling`` if given, else the ``alpha`` of the first
    adapter loaded. An adapter with another alpha has its B rows scaled by
    ``alpha / scaling`` when copied in, so every slot is exact under the one scale.

    Thread-safe: a lock guards the bookkeeping, and `acquire` holds it while it loads and
    copies (a load from disk delays other acquires, releases and discards meanwhile).
    """

    def __init__(self, *, num_layers: int, in_features: int, out_features: int, max_rank: int,
                 budget_bytes: int, device: str | torch.device, dtype: torch.dtype = torch.float32,
                 scaling: float | None = None):
        for name, value in (("num_layers", num_layers), ("in_features", in_features),
                            ("out_features", out_features), ("max_rank", max_rank)):
            if type(value) is not int or value < 1:
                fail(name, "an int >= 1", value)
        if type(budget_bytes) is not int or budget_bytes < 0:
            fail("budget_bytes", "an int >= 0", budget_bytes)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            fail("dtype", "a floating-point torch.dtype", dtype)
        self.num_layers, self.in_features, self.out_features = num_layers, in_features, out_features
        self.max_rank, self.dtype = max_rank, dtype
        self.slot_bytes = num_layers * max_rank * (in_features + out_features) * dtype.itemsize
        capacity = budget_bytes // self.slot_bytes
        if capacity < 1:
            fail("budget_bytes", f"at least {self.slot_bytes} (one slot: L·max_rank·(I+O)·{dtype.itemsize} bytes "
                 f"= {num_layers}·{max_rank}·({in_features}+{out_features})·{dtype.itemsize})", budget_bytes)
        self.capacity = capacity
        self.A = torch.zeros(capacity, num_layers, max_rank, in_features, device=device, dtype=dtype)
        self.B = torch.zeros(capacity, num_layers, max_rank, out_features, device=device, dtype=dtype)
        self.ranks = torch.zeros(capacity, device=device, dtype=torch.int64)
        if scaling is not None and not (isinstance(scaling, (int, float)) and scaling > 0):
            fail("scaling", "a number > 0 or None (the first adapter's alpha)", scaling)
        self.scaling = None if scaling is None else float(scaling)
        self._lock = threading.Lock()
        self._slot_of: dict[Hashable, int] = {}
        self._key_of: list[Hashable | None] = [None] * capacity  # None: empty, or discarded while pinned
        self._refs = [0] * capacity
        self._doomed: set[int] = set()  # discarded while pinned: emptied on the last release
        self._recency: OrderedDict[int, None] = OrderedDict()  # resident slots, least recent first
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self._hits = self._misses = self._evictions = 0

    def acquire(self, key: Hashable, load: Callable[[], Adapters]) -> int:
        """Slot index of the adapter under ``key``, pinned (+1 reference; `release` it).

        Hit: no copy. Miss: ``load()`` gives the adapter (one video, rank ≤ max_rank, this
        pool's L, I and O); it goes into a free slot, else over the least recently used
        unpinned one (an eviction). `PoolExhausted` when every slot is pinned; ValueError
        naming the key when the adapter does not fit. A failed load evicts nothing.
        """
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is not None:
                self._hits += 1
                self._pin(slot)
                return slot
            if not self._free and all(self._refs[s] > 0 for s in self._recency):
                raise PoolExhausted(f"adapter pool: all {self.capacity} slots are pinned by running requests; "
                                    f"retry when one is released")
            adapters = load()
            self._check(key, adapters)
            self._misses += 1
            if self._free:
                slot = self._free.pop()
            else:
                slot = next(s for s in self._recency if self._refs[s] == 0)
                del self._slot_of[self._key_of[slot]]
                del self._recency[slot]
                self._evictions += 1
            self._copy_in(slot, adapters)
            self._slot_of[key] = slot
            self._key_of[slot] = key
            self._pin(slot)
            return slot

    def _pin(self, slot: int) -> None:
        self._refs[slot] += 1
        self._recency[slot] = None
        self._recency.move_to_end(slot)

    def _check(self, key: Hashable, adapters: Adapters) -> None:
        name = f"adapter {key!r}"
        if not isinstance(adapters, Adapters):
            fail(name, "an Adapters from load()", type(adapters).__name__)
        if len(adapters) != 1:
            fail(name, "the adapters of one video (n == 1)", f"n = {len(adapters)}")
        shape = (adapters.A.shape[1], adapters.A.shape[3], adapters.B.shape[3])
        if shape != (self.num_layers, self.in_features, self.out_features):
            fail(name, f"L, I, O = {self.num_layers}, {self.in_features}, {self.out_features} (the pool's)",
                 ", ".join(map(str, shape)))
        if adapters.rank > self.max_rank:
            fail(name, f"rank <= {self.max_rank} (the pool's max_rank; strip the bias block with without_bias() "
                 f"or make a pool with a larger max_rank)", f"rank {adapters.rank}")

    def _copy_in(self, slot: int, adapters: Adapters) -> None:
        R = adapters.rank
        if self.scaling is None:
            if not adapters.alpha > 0:
                fail("alpha", "> 0 (the first adapter's alpha becomes the pool's scaling)", adapters.alpha)
            self.scaling = float(adapters.alpha)
        B = adapters.B[0]
        if float(adapters.alpha) != self.scaling:
            B = B * (float(adapters.alpha) / self.scaling)
        self.A[slot, :, :R].copy_(adapters.A[0])
        self.B[slot, :, :R].copy_(B)
        self.A[slot, :, R:].zero_()
        self.B[slot, :, R:].zero_()
        self.ranks[slot] = R

    def release(self, slot: int) -> None:
        """Unpin a slot from `acquire` (−1 reference); a slot whose key was discarded is
        emptied on its last release. ValueError for a slot that is not pinned."""
        with self._lock:
            if type(slot) is not int or not 0 <= slot < self.capacity or self._refs[slot] == 0:
                fail("slot", "a pinned slot of this pool (from acquire, not yet released)", slot)
            self._refs[slot] -= 1
            self._recency.move_to_end(slot)
            if self._refs[slot] == 0 and slot in self._doomed:
                self._doomed.discard(slot)
                self._empty(slot)

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` (after its adapter was deleted or replaced): the next `acquire` of it
        loads afresh. An unpinned slot is emptied now, a pinned one on its last release."""
        with self._lock:
            slot = self._slot_of.pop(key, None)
            if slot is None:
                return
            self._key_of[slot] = None
            if self._refs[slot] > 0:
                self._doomed.add(slot)
            else:
                self._empty(slot)

    def _empty(self, slot: int) -> None:
        key = self._key_of[slot]
        if key is not None:
            del self._slot_of[key]
        self._key_of[slot] = None
        del self._recency[slot]
        self.ranks[slot] = 0
        self._free.append(slot)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is resident (an `acquire` of it would be a hit)."""
        with self._lock:
            return key in self._slot_of

    @property
    def stats(self) -> dict:
        """Counters: ``hits``, ``misses`` (adapters loaded), ``evictions`` (since creation), ``resident`` (slots
        holding an adapter, including discarded ones still pinned), ``pinned`` (slots with
        references) and ``capacity``."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "evictions": self._evictions,
                    "resident": len(self._recency), "pinned": sum(r > 0 for r in self._refs),
                    "capacity": self.capacity}
