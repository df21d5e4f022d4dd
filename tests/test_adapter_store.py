"""The serving engine's adapter store (ids, atomic files, memory, fingerprints, versions) and
device pool (budget, LRU, pinning, mixed ranks read by `lora_sgmv`)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from v2l_fast.adapters import Adapters
from v2l_fast.adapters.store import AdapterNotFound, AdapterPool, AdapterStore, PoolExhausted, check_adapter_id
from v2l_fast.ops import available_backends, lora_sgmv
from v2l_fast.ops.registry import BACKENDS, runtime_missing
from v2l_fast.testing import assert_rel_close

L, I, H = 2, 20, 12  # layers, down_proj in (intermediate) and out (hidden) features
BASE = {"name": "tiny-base", "num_layers": L, "hidden_size": H, "intermediate_size": I,
        "down_proj_sha256": "a" * 64, "model_type": "llama"}
ID_MESSAGE = ("adapter_id: expected 1 to 128 characters from A-Z a-z 0-9 . _ - that start with a letter or digit "
              "and hold no '..', got {}")


def make(rank: int = 4, seed: int = 0, *, alpha: float = 16.0, base: dict | None = None, n: int = 1,
         bias_rank: int = 0) -> Adapters:
    """Random adapters of n videos for the tiny base."""
    gen = torch.Generator().manual_seed(seed)
    return Adapters(torch.randn(n, L, rank, I, generator=gen), torch.randn(n, L, rank, H, generator=gen),
                    alpha, dict(BASE if base is None else base), bias_rank)


def assert_same(got: Adapters, want: Adapters) -> None:
    assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B)
    assert (got.alpha, got.base, got.bias_rank) == (want.alpha, want.base, want.bias_rank)
    assert got.A.device.type == "cpu"


# --- ids ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("good", ["v", "video-0001", "A.b_c-9", "clip.2024-01-01_cam3", "x" * 128])
def test_valid_ids_pass_through(good):
    assert check_adapter_id(good) == good


@pytest.mark.parametrize("bad, shown", [
    ("../x", "'../x'"), ("a/b", "'a/b'"), ("a\\b", "'a\\\\b'"), ("", "''"), (".hidden", "'.hidden'"),
    ("a..b", "'a..b'"), ("-flag", "'-flag'"), ("a b", "'a b'"), ("vidéo", "'vidéo'"), ("x" * 129, None),
    ("x" * 10_000, None), (None, "None"), (7, "7"), ("/etc/passwd", "'/etc/passwd'"), ("a\x00", "'a\\x00'"),
])
def test_invalid_ids_are_refused_with_the_pinned_message(bad, shown):
    with pytest.raises(ValueError) as err:
        check_adapter_id(bad)
    if shown is not None:
        assert str(err.value) == ID_MESSAGE.format(shown)
    else:  # a long id is shown shortened, never echoed whole
        assert str(err.value).startswith(ID_MESSAGE.format("'xxxx"))
        assert len(str(err.value)) < 250 and f"({len(bad) + 2} characters)" in str(err.value)


def test_store_never_touches_a_path_outside_its_root(tmp_path):
    root = tmp_path / "adapters"
    store = AdapterStore(root)
    for bad in ("../escape", "a/b", "/tmp/abs"):
        for method, args in ((store.put, (bad, make())), (store.get, (bad,)), (store.delete, (bad,)),
                             (store.version, (bad,))):
            with pytest.raises(ValueError) as err:
                method(*args)
            assert type(err.value) is ValueError  # an invalid id is not a 404
        assert bad not in store
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adapters"]


# --- the store -----------------------------------------------------------------------------------

def test_persisted_adapters_survive_a_restart(tmp_path):
    first = AdapterStore(tmp_path, base=BASE)
    clip, other = make(rank=5, seed=1, bias_rank=2), make(rank=3, seed=2)
    first.put("clip-1", clip)
    first.put("clip-2", other)
    assert sorted(os.listdir(tmp_path)) == ["clip-1.safetensors", "clip-2.safetensors"]

    again = AdapterStore(tmp_path, base=BASE)  # a new process on the same folder
    assert again.ids() == ["clip-1", "clip-2"] and len(again) == 2 and "clip-1" in again
    assert_same(again.get("clip-1"), clip)
    assert_same(again.get("clip-2"), other)
    assert Adapters.load(tmp_path / "clip-1.safetensors").bias_rank == 2  # the ordinary adapters file


@pytest.mark.parametrize("crash", ["while writing", "at the rename"])
def test_a_crash_during_put_keeps_the_old_adapter_and_leaves_no_partial_file(tmp_path, monkeypatch, crash):
    store = AdapterStore(tmp_path)
    old, new = make(seed=1), make(seed=2)
    store.put("clip", old)
    version = store.version("clip")

    def half_written(self, path):  # what a crash mid-write leaves: a truncated file
        with open(path, "wb") as handle:
            handle.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"A\":")
        raise OSError("disk full")

    def no_rename(src, dst):
        raise OSError("power cut")

    if crash == "while writing":
        monkeypatch.setattr(Adapters, "save", half_written)
    else:
        monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        store.put("clip", new)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["clip.safetensors"]  # no temporary or partial file anywhere
    assert_same(store.get("clip"), old)
    assert_same(AdapterStore(tmp_path).get("clip"), old)
    assert store.version("clip") == version  # nothing was replaced
    store.put("clip", new)
    assert_same(store.get("clip"), new)


def test_a_temporary_file_left_by_a_killed_writer_is_invisible(tmp_path):
    store = AdapterStore(tmp_path)
    store.put("clip", make())
    (tmp_path / ".late.safetensors.k3j2.tmp").write_bytes(b"\x00" * 7)  # a writer killed before its rename
    (tmp_path / "notes.txt").write_text("not an adapter")
    assert store.ids() == ["clip"] and len(store) == 1
    assert "late" not in store
    with pytest.raises(AdapterNotFound):
        store.get("late")


def test_a_reader_sees_the_old_or_the_new_adapter_never_a_mix(tmp_path):
    store = AdapterStore(tmp_path)
    versions = [make(rank=8, seed=s) for s in (1, 2)]
    store.put("clip", versions[0])
    errors: list[BaseException] = []
    done = threading.Event()

    def writer():
        try:
            for i in range(30):
                store.put("clip", versions[i % 2])
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while not done.is_set() or reads == 0:
        got = store.get("clip")
        assert any(torch.equal(got.A, v.A) and torch.equal(got.B, v.B) for v in versions)
        reads += 1
    thread.join()
    assert not errors and os.listdir(tmp_path) == ["clip.safetensors"]


def test_in_memory_adapters_are_never_written(tmp_path):
    store = AdapterStore(tmp_path)
    mine = make(seed=3)
    store.put("upload", mine, persist=False)
    assert os.listdir(tmp_path) == []
    assert store.ids() == ["upload"] and "upload" in store
    assert_same(store.get("upload"), mine)
    mine.A.zero_()  # the caller's tensors are copied: changing them later changes nothing stored
    assert not torch.equal(store.get("upload").A, mine.A)
    assert AdapterStore(tmp_path).ids() == []  # gone with the process, as promised

    memory_only = AdapterStore()  # no root: persist=True keeps it in memory too
    memory_only.put("clip", make(seed=4))
    assert memory_only.ids() == ["clip"]
    assert_same(memory_only.get("clip"), make(seed=4))


def test_memory_put_over_a_persisted_id_removes_the_file(tmp_path):
    store = AdapterStore(tmp_path)
    store.put("clip", make(seed=1))
    store.put("clip", make(seed=2), persist=False)
    assert os.listdir(tmp_path) == []  # a restart must not bring the replaced adapter back
    assert_same(store.get("clip"), make(seed=2))
    store.put("clip", make(seed=3))  # and back to disk: the memory copy goes
    assert os.listdir(tmp_path) == ["clip.safetensors"]
    assert_same(store.get("clip"), make(seed=3))


def test_put_takes_one_video(tmp_path):
    with pytest.raises(ValueError, match=r"adapters: expected the adapters of one video .*got n = 3"):
        AdapterStore(tmp_path).put("batch", make(n=3))
    assert os.listdir(tmp_path) == []


def test_adapters_of_another_base_are_refused_on_put_and_get(tmp_path):
    other = dict(BASE, name="other-base", down_proj_sha256="b" * 64)
    store = AdapterStore(tmp_path, base=BASE)
    with pytest.raises(ValueError) as err:
        store.put("clip", make(base=other))
    assert str(err.value) == (
        "adapter 'clip': expected adapters made for this base model ('tiny-base'), got adapters made for "
        f"another base model ('other-base'): down_proj_sha256 is {'b' * 64!r} in the adapters but "
        f"{'a' * 64!r} expected")
    assert os.listdir(tmp_path) == []

    AdapterStore(tmp_path).put("clip", make(base=other))  # written by a store that checks nothing
    with pytest.raises(ValueError, match=r"^adapter 'clip': expected adapters made for this base model.*"
                                         r"down_proj_sha256"):
        store.get("clip")

    renamed = dict(BASE, name="a local copy of tiny-base")  # the name is informative only
    store.put("same", make(base=renamed))
    assert store.get("same").base["name"] == "a local copy of tiny-base"

    wider = dict(BASE, hidden_size=H + 1)
    with pytest.raises(ValueError, match=r"hidden_size \(H\) is 12 in the adapters but 13 expected"):
        AdapterStore(base=wider).put("clip", make())


def test_check_fingerprint_without_a_model():
    adapters = make()
    adapters.check_fingerprint(BASE)
    dims_only = {k: BASE[k] for k in ("num_layers", "hidden_size", "intermediate_size")}
    adapters.check_fingerprint(dims_only)  # no hash: the weights are not compared
    with pytest.raises(ValueError, match=r"^clip: expected adapters made for this base model.*num_layers \(L\) is 2"):
        adapters.check_fingerprint(dict(BASE, num_layers=3), name="clip")
    with pytest.raises(ValueError, match=r"^fingerprint: expected a base-model fingerprint dict with num_layers, "
                                         r"hidden_size, intermediate_size, got keys \['name'\]"):
        adapters.check_fingerprint({"name": "x"})


def test_versions_change_on_every_put_and_delete(tmp_path):
    store = AdapterStore(tmp_path)
    assert store.version("clip") == 0
    seen = [store.version("clip")]
    store.put("clip", make(seed=1))
    seen.append(store.version("clip"))
    store.put("clip", make(seed=1))  # the same weights again still count as a replacement
    seen.append(store.version("clip"))
    assert store.delete("clip") is True
    seen.append(store.version("clip"))
    assert store.delete("clip") is False
    assert store.version("clip") == seen[-1]  # nothing deleted, nothing changed
    store.put("clip", make(seed=2), persist=False)
    seen.append(store.version("clip"))
    assert seen == [0, 1, 2, 3, 4]  # up by one each time: the version before a put is version - 1
    assert store.version("other") == 0


def test_unknown_ids_raise_adapter_not_found(tmp_path):
    for store in (AdapterStore(tmp_path), AdapterStore()):
        with pytest.raises(AdapterNotFound) as err:
            store.get("missing")
        assert isinstance(err.value, ValueError) and err.value.adapter_id == "missing"
        assert str(err.value) == "adapter_id: expected the id of a stored adapter, got 'missing' (no such adapter)"
        store.put("gone", make())
        store.delete("gone")
        with pytest.raises(AdapterNotFound):
            store.get("gone")
        assert "gone" not in store and store.ids() == []


def test_a_corrupt_file_is_an_error_not_a_404(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="broken.safetensors") as err:
        AdapterStore(tmp_path).get("broken")
    assert not isinstance(err.value, AdapterNotFound)


# --- the pool ------------------------------------------------------------------------------------

def make_pool(slots: int = 2, max_rank: int = 8, device: str | torch.device = "cpu", **kwargs) -> AdapterPool:
    slot_bytes = L * max_rank * (I + H) * 4
    return AdapterPool(num_layers=L, in_features=I, out_features=H, max_rank=max_rank,
                       budget_bytes=slots * slot_bytes + slot_bytes - 1, device=device, **kwargs)


class Loads:
    """A ``load`` factory that counts its calls per key."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, key: str, rank: int = 4, alpha: float = 16.0):
        def load():
            self.calls.append(key)
            return make(rank=rank, seed=sum(map(ord, key)), alpha=alpha)
        return load


def test_budget_sets_capacity_and_shapes():
    pool = AdapterPool(num_layers=L, in_features=I, out_features=H, max_rank=8,
                       budget_bytes=3 * L * 8 * (I + H) * 4 + 100, device="cpu")
    assert pool.slot_bytes == L * 8 * (I + H) * 4 and pool.capacity == 3
    assert pool.A.shape == (3, L, 8, I) and pool.B.shape == (3, L, 8, H)
    assert pool.ranks.dtype == torch.int64 and pool.ranks.tolist() == [0, 0, 0]
    half = AdapterPool(num_layers=L, in_features=I, out_features=H, max_rank=8,
                       budget_bytes=3 * L * 8 * (I + H) * 4, device="cpu", dtype=torch.bfloat16)
    assert half.capacity == 6 and half.A.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"^budget_bytes: expected at least 1024 \(one slot: .* = 2·8·\(20\+12\)·2\), "
                                         r"got 1023$"):
        AdapterPool(num_layers=L, in_features=I, out_features=H, max_rank=8, budget_bytes=1023, device="cpu",
                    dtype=torch.float16)


def test_hits_do_not_copy_and_the_least_recently_used_is_evicted():
    pool, loads = make_pool(slots=2), Loads()
    a = pool.acquire("a", loads("a"))
    pool.release(a)
    b = pool.acquire("b", loads("b"))
    pool.release(b)
    assert pool.acquire("a", loads("a")) == a  # hit: a is now more recent than b
    pool.release(a)
    assert loads.calls == ["a", "b"]
    c = pool.acquire("c", loads("c"))
    pool.release(c)
    assert c == b and "b" not in pool and "a" in pool  # b was the least recently used
    pool.release(pool.acquire("b", loads("b")))  # b comes back over a (now the oldest)
    assert "a" not in pool and "c" in pool
    assert loads.calls == ["a", "b", "c", "b"]
    assert pool.stats == {"hits": 1, "misses": 4, "evictions": 2, "resident": 2, "pinned": 0, "capacity": 2}


def test_pinned_slots_are_never_evicted():
    pool, loads = make_pool(slots=2), Loads()
    held = pool.acquire("long-answer", loads("long-answer"))  # oldest, but pinned
    for key in ("b", "c", "d"):
        pool.release(pool.acquire(key, loads(key)))
    assert "long-answer" in pool and pool.stats["evictions"] == 2
    want = loads("long-answer")()
    assert torch.equal(pool.A[held, :, :4], want.A[0]) and torch.equal(pool.B[held, :, :4], want.B[0])
    pool.release(held)


def test_a_full_pool_of_pinned_slots_is_exhausted_until_a_release():
    pool, loads = make_pool(slots=2), Loads()
    first = pool.acquire("a", loads("a"))
    pool.acquire("b", loads("b"))
    before = pool.stats
    with pytest.raises(PoolExhausted, match="all 2 slots are pinned"):
        pool.acquire("c", loads("c"))
    assert loads.calls == ["a", "b"] and pool.stats == before  # no load, nothing counted
    assert pool.acquire("a", loads("a")) == first  # a hit needs no free slot
    pool.release(first)
    pool.release(first)
    assert pool.acquire("c", loads("c")) == first
    assert pool.stats["pinned"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapters_of_mixed_ranks_share_one_batch(backend):
    device = torch.device("cuda" if torch.cuda.is_available() and backend != "cpp" else "cpu")
    if backend not in available_backends("lora_sgmv") or runtime_missing(backend, device):
        pytest.skip(f"{backend}: {runtime_missing(backend, device) or 'not available'}")
    pool = make_pool(slots=4, max_rank=8, device=device)
    adapters = {"r3": make(rank=3, seed=1), "r8": make(rank=8, seed=2), "r5": make(rank=5, seed=3, alpha=4.0)}
    slots = {key: pool.acquire(key, lambda a=a: a) for key, a in adapters.items()}
    assert pool.scaling == 16.0  # the first adapter's alpha; r5's B is rescaled to it
    assert pool.ranks[list(slots.values())].tolist() == [3, 8, 5]
    for key, slot in slots.items():  # rows past an adapter's rank must never be read
        pool.A[slot, :, adapters[key].rank:] = float("nan")
        pool.B[slot, :, adapters[key].rank:] = float("nan")

    lengths = {"r3": 5, "r8": 1, "r5": 7}  # a prefill, a decode token, another prefill
    order = ["r3", "r8", "r5", "r3"]
    counts = [lengths[k] for k in order]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), I, generator=gen)
    seg_indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    seg_adapter = torch.tensor([slots[k] for k in order])
    for layer in range(L):
        out = lora_sgmv(x.to(device), pool.A, pool.B, seg_indptr.to(device), seg_adapter.to(device),
                        ranks=pool.ranks, layer=layer, scaling=pool.scaling, backend=backend).cpu()
        want = torch.cat([adapters[k].alpha * (xs @ adapters[k].A[0, layer].T) @ adapters[k].B[0, layer]
                          for k, xs in zip(order, x.split(counts))])
        assert torch.isfinite(out).all()
        assert_rel_close(out, want, torch.float32)


def test_rows_past_the_rank_are_zeroed_when_a_slot_is_reused():
    pool = make_pool(slots=1, max_rank=8)
    pool.release(pool.acquire("big", lambda: make(rank=8, seed=1)))
    slot = pool.acquire("small", lambda: make(rank=2, seed=2))
    assert pool.ranks[slot] == 2
    assert not pool.A[slot, :, 2:].any() and not pool.B[slot, :, 2:].any()


def test_an_adapter_that_does_not_fit_is_refused_and_evicts_nothing():
    pool, loads = make_pool(slots=1, max_rank=4), Loads()
    pool.release(pool.acquire("kept", loads("kept")))
    with pytest.raises(ValueError, match=r"^adapter 'wide': expected rank <= 4 \(the pool's max_rank; strip the bias "
                                         r"block with without_bias\(\) .*got rank 6$"):
        pool.acquire("wide", loads("wide", rank=6))
    with pytest.raises(ValueError, match=r"^adapter 'pair': expected the adapters of one video \(n == 1\), got n = 2$"):
        pool.acquire("pair", lambda: make(n=2))
    with pytest.raises(ValueError, match=r"^adapter 'other': expected L, I, O = 2, 20, 12 \(the pool's\), "
                                         r"got 2, 20, 13$"):
        pool.acquire("other", lambda: Adapters(torch.zeros(1, L, 2, I), torch.zeros(1, L, 2, H + 1), 1.0, {}))

    def broken():
        raise AdapterNotFound("gone")

    with pytest.raises(AdapterNotFound):
        pool.acquire("gone", broken)
    assert "kept" in pool
    assert pool.stats == {"hits": 0, "misses": 1, "evictions": 0, "resident": 1, "pinned": 0, "capacity": 1}


def test_discarding_a_pinned_key_frees_its_slot_on_the_last_release():
    pool, loads = make_pool(slots=3), Loads()
    old = pool.acquire("clip", loads("clip"))
    assert pool.acquire("clip", loads("clip")) == old  # two requests hold it
    pool.discard("clip")  # the adapter was replaced meanwhile
    assert "clip" not in pool
    new = pool.acquire("clip", loads("clip"))  # a later request loads afresh, elsewhere
    assert new != old and loads.calls == ["clip", "clip"]
    pool.release(old)
    assert pool.stats["resident"] == 2 and pool.ranks[old] == 4  # still read by the other request
    pool.release(old)
    assert pool.stats["resident"] == 1 and pool.ranks[old] == 0  # gone with the last release
    with pytest.raises(ValueError, match=r"^slot: expected a pinned slot of this pool .*got 0$"):
        pool.release(old)
    pool.release(new)
    pool.discard("clip")  # unpinned: emptied at once
    pool.discard("never-there")
    assert pool.stats["resident"] == 0 and pool.ranks.tolist() == [0, 0, 0]


def test_store_and_pool_never_serve_a_replaced_adapter(tmp_path):
    store, pool = AdapterStore(tmp_path, base=BASE), make_pool(slots=2)

    def serve(adapter_id):  # the engine's order: version first, then the load
        key = (adapter_id, store.version(adapter_id))
        slot = pool.acquire(key, lambda: store.get(adapter_id).without_bias())
        rows = pool.A[slot, :, :int(pool.ranks[slot])].clone()
        pool.release(slot)
        return key, rows

    store.put("clip", make(rank=5, seed=1, bias_rank=1))
    key1, rows = serve("clip")
    assert torch.equal(rows, make(rank=5, seed=1).A[0, :, :4])  # the bias row was stripped
    store.put("clip", make(rank=3, seed=2))
    key2, rows = serve("clip")
    assert key2 != key1 and torch.equal(rows, make(rank=3, seed=2).A[0])
    pool.discard(key1)
    assert pool.stats["resident"] == 1
    store.delete("clip")
    with pytest.raises(AdapterNotFound):
        serve("clip")


def test_engine_and_handler_threads_share_the_pool():
    pool = make_pool(slots=3, max_rank=4)
    keys = [f"v{i}" for i in range(6)]
    errors: list[BaseException] = []

    def worker(seed):
        gen = torch.Generator().manual_seed(seed)
        try:
            for _ in range(150):
                key = keys[int(torch.randint(len(keys), (1,), generator=gen))]
                try:
                    slot = pool.acquire(key, lambda k=key: make(seed=int(k[1:])))
                except PoolExhausted:
                    continue
                assert torch.equal(pool.A[slot, :, :4], make(seed=int(key[1:])).A[0])
                if seed == 0:
                    pool.discard(key)
                pool.release(slot)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = pool.stats
    assert stats["pinned"] == 0 and stats["resident"] <= 3
    assert stats["hits"] + stats["misses"] >= 150
