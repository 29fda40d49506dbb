"""What the store promises under concurrency and failure (README, "Store semantics"), each once broken:

the write-back worker died on any exception but ``CorruptEntry`` (then ``flush``/``close`` hung); it held
the store's write lock during slow writes; ``put_blob`` was overwritten later by an older pending value; a
``get`` racing a ``delete`` re-promoted the deleted entry; ``put`` after ``close`` was lost; an oversized
``put`` left the previous value readable; TTLs were lost on ``get_blob`` and bad TTLs wrote some tiers.
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ragkv.codecs import get_codec
from ragkv.kvstore import (
    ChunkKV,
    ChunkMeta,
    ConfigError,
    DiskConfig,
    HostConfig,
    StoreConfig,
    TieredStore,
    encode_entry,
    read_header,
)
from ragkv.kvstore.errors import StoreClosed, StoreWriteError
from ragkv.kvstore.tiers.disk import DiskTier


class FaultyDisk(DiskTier):
    """A real disk tier with injected faults: ``fail`` keys raise on write, ``slow`` keys take a while."""

    def __init__(self, path: Path) -> None:
        super().__init__(DiskConfig(path=str(path), fsync=False))
        self.fail: set[str] = set()
        self.slow: dict[str, float] = {}
        self.slow_reads: dict[str, float] = {}

    def put_blob(self, key: str, blob: bytes, ttl_s: float | None = None) -> None:
        time.sleep(self.slow.get(key, 0.0))
        if key in self.fail:
            raise RuntimeError(f"injected failure writing {key}")
        super().put_blob(key, blob, ttl_s)

    def get_blob(self, key: str) -> bytes | None:
        time.sleep(self.slow_reads.get(key, 0.0))
        return super().get_blob(key)


def store_over(disk: FaultyDisk, write_back: bool = True, host_bytes: int | None = None) -> TieredStore:
    from ragkv.kvstore.tiers import make_tier

    host = make_tier(HostConfig(capacity_bytes=host_bytes))
    store = TieredStore([host, disk])
    if write_back:
        store.close()
        cfg = StoreConfig(tiers=(host.config, disk.config), write_policy="write-back")
        store = TieredStore(cfg)
        store.tiers[1] = disk  # the faulty tier in place of the plain one built from its config
        store.tiers[1].limits = store.limits
    return store


def chunk_of(value: float, tokens: int = 4) -> ChunkKV:
    kv = torch.full((2, 2, 2, tokens, 8), value, dtype=torch.float32)
    return ChunkKV(kv, ChunkMeta("test-model", tuple(range(tokens)), position=1, dtype="float32"))


def value_of(chunk: ChunkKV | None) -> float | None:
    return None if chunk is None else float(chunk.kv.flatten()[0])


def k(i: int) -> str:
    return f"t1:{i:040x}"


def test_write_back_worker_survives_a_failing_tier_and_close_returns(tmp_path: Path) -> None:
    disk = FaultyDisk(tmp_path)
    store = store_over(disk)
    disk.fail.add(k(1))
    store.put(k(1), chunk_of(1.0))
    store.put(k(2), chunk_of(2.0))
    assert store.flush(timeout_s=10)
    stats = store.stats()
    assert stats["writeback_failed"] == 1 and stats["writeback_pending"] == 0
    assert not disk.contains(k(1)) and value_of(disk.get(k(2))) == 2.0
    store.put(k(3), chunk_of(3.0))  # the worker is still alive
    assert store.flush(timeout_s=10) and value_of(disk.get(k(3))) == 3.0
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive()


def test_non_finite_kv_is_refused_at_put(tmp_path: Path) -> None:
    with TieredStore(f"host,disk:{tmp_path}") as store:
        bad = chunk_of(float("nan"))
        with pytest.raises(ConfigError, match="non-finite"):
            store.put(k(1), bad)
        assert not store.contains(k(1))


def test_worker_holds_only_the_key_it_writes(tmp_path: Path) -> None:
    disk = FaultyDisk(tmp_path)
    store = store_over(disk)
    disk.slow[k(1)] = 1.5
    store.put(k(1), chunk_of(1.0))
    time.sleep(0.1)  # the worker is now inside the slow write of k(1)
    start = time.perf_counter()
    store.put(k(2), chunk_of(2.0))
    assert store.delete(k(2))
    store.put(k(3), chunk_of(3.0))
    assert value_of(store.get(k(3))) == 3.0
    assert time.perf_counter() - start < 0.5  # not held up by the slow write of another key
    store.close()


def test_put_blob_wins_over_an_older_pending_write_back(tmp_path: Path) -> None:
    disk = FaultyDisk(tmp_path)
    store = store_over(disk)
    disk.slow[k(9)] = 0.5  # keeps the queue busy so k(1) is still pending when put_blob arrives
    store.put(k(9), chunk_of(9.0))
    store.put(k(1), chunk_of(1.0))
    store.put_blob(k(1), encode_entry(chunk_of(2.0), get_codec("raw"), key=k(1)))
    assert store.flush(timeout_s=10)
    assert value_of(store.get(k(1))) == 2.0 and value_of(disk.get(k(1))) == 2.0
    store.close()


def test_delete_wins_over_a_promotion_in_flight(tmp_path: Path) -> None:
    disk = FaultyDisk(tmp_path)
    store = store_over(disk, write_back=False)
    store.put(k(1), chunk_of(1.0))
    store.tiers[0].delete(k(1))  # only on disk now: the next get reads it there and promotes
    disk.slow_reads[k(1)] = 0.4
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(store.get(k(1))))
    reader.start()
    time.sleep(0.1)
    assert store.delete(k(1))
    reader.join()
    assert value_of(got[0]) in (1.0, None)
    assert not store.contains(k(1)) and store.get(k(1)) is None  # not resurrected by the promotion
    store.close()


def test_closed_store_raises(tmp_path: Path) -> None:
    for policy in ("write-through", "write-back"):
        store = TieredStore(StoreConfig(tiers=(HostConfig(), DiskConfig(path=str(tmp_path / policy))),
                                        write_policy=policy))
        store.close()
        with pytest.raises(StoreClosed):
            store.put(k(1), chunk_of(1.0))
        with pytest.raises(StoreClosed):
            store.get(k(1))


def test_oversized_put_leaves_no_stale_value(tmp_path: Path) -> None:
    small, big = chunk_of(1.0), chunk_of(2.0, tokens=64)
    with TieredStore(StoreConfig(tiers=(HostConfig(capacity_bytes=small.nbytes * 2),
                                        DiskConfig(path=str(tmp_path))))) as store:
        store.put(k(1), small)
        store.put(k(1), big)  # too large for host: host must not keep the old value
        assert store.tiers[0].get(k(1)) is None
        assert value_of(store.get(k(1))) == 2.0


@pytest.mark.parametrize("ttl", [float("inf"), float("nan"), -1.0, 0.0, True])
def test_bad_ttl_is_refused_before_any_tier_is_written(tmp_path: Path, ttl: Any) -> None:
    with TieredStore(f"host,disk:{tmp_path}") as store:
        with pytest.raises(ConfigError, match="ttl_s"):
            store.put(k(1), chunk_of(1.0), ttl_s=ttl)
        with pytest.raises(ConfigError, match="ttl_s"):
            store.put_blob(k(1), encode_entry(chunk_of(1.0), get_codec("raw"), key=k(1)), ttl_s=ttl)
        assert all(not t.contains(k(1)) for t in store.tiers)


def test_a_tier_that_raises_leaves_no_tier_holding_the_value(tmp_path: Path) -> None:
    disk = FaultyDisk(tmp_path)
    store = store_over(disk, write_back=False)
    store.put(k(1), chunk_of(1.0))
    disk.fail.add(k(1))
    with pytest.raises(StoreWriteError):
        store.put(k(1), chunk_of(2.0))
    assert all(not t.contains(k(1)) for t in store.tiers)  # neither the new value nor the stale one
    store.close()


def test_ttl_travels_through_get_blob_and_promotion(tmp_path: Path) -> None:
    with TieredStore(f"host,disk:{tmp_path}") as store:
        store.put(k(1), chunk_of(1.0), ttl_s=30)
        host_blob = store.tiers[0].get_blob(k(1))
        assert host_blob is not None and read_header(host_blob).expires_at is not None
        blob = store.get_blob(k(1))
        assert blob is not None and 25 < read_header(blob).expires_at - time.time() <= 30  # type: ignore[operator]
        store.tiers[0].delete(k(1))
        assert store.get(k(1)) is not None  # promoted back into host
        assert 25 < store.tiers[0].expiry(k(1)) - time.time() <= 30  # type: ignore[operator]


def test_a_value_waiting_for_write_back_expires_on_time(tmp_path: Path) -> None:
    disk = FaultyDisk(tmp_path)
    store = store_over(disk)
    disk.slow[k(9)] = 0.8  # keeps the worker busy while k(1) waits in the queue
    store.put(k(9), chunk_of(9.0))
    store.put(k(1), chunk_of(1.0), ttl_s=0.3)
    time.sleep(0.4)
    assert store.get(k(1)) is None and store.get_blob(k(1)) is None
    assert store.flush(timeout_s=10) and not disk.contains(k(1))
    store.close()


def test_pinned_entries_still_expire(tmp_path: Path) -> None:
    with TieredStore(f"host,disk:{tmp_path}") as store:
        store.put(k(1), chunk_of(1.0), ttl_s=0.3)
        store.pin(k(1))
        time.sleep(0.4)
        assert store.get(k(1)) is None


def test_seeded_concurrent_stress_matches_a_model(tmp_path: Path) -> None:
    """Writers own disjoint keys (so each key's expected value is exact); readers read any key and may only
    ever see a value written to that very key. Host is small, so entries move between tiers all along."""
    probe = chunk_of(0.0)
    cfg = StoreConfig(tiers=(HostConfig(capacity_bytes=probe.nbytes * 6), DiskConfig(path=str(tmp_path), fsync=False)),
                      write_policy="write-back", write_queue_size=8)
    store = TieredStore(cfg)
    keys_per_writer, writers, ops = 5, 4, 150
    written: dict[str, set[float]] = {k(i): set() for i in range(keys_per_writer * writers)}
    final: dict[str, float | None] = {}
    errors: list[str] = []

    def writer(w: int) -> None:
        rng = random.Random(w)
        mine = [k(w * keys_per_writer + i) for i in range(keys_per_writer)]
        expected: dict[str, float | None] = dict.fromkeys(mine)
        for n in range(ops):
            key = rng.choice(mine)
            op = rng.random()
            value = float(w * 100000 + n)
            if op < 0.4:
                written[key].add(value)
                store.put(key, chunk_of(value))
                expected[key] = value
            elif op < 0.6:
                written[key].add(value)
                store.put_blob(key, encode_entry(chunk_of(value), get_codec("raw"), key=key))
                expected[key] = value
            elif op < 0.75:
                store.delete(key)
                expected[key] = None
            got = value_of(store.get(key))
            if got != expected[key]:
                errors.append(f"{key}: read {got}, expected {expected[key]}")
        final.update(expected)

    def reader(r: int) -> None:
        rng = random.Random(1000 + r)
        for _ in range(ops):
            key = k(rng.randrange(keys_per_writer * writers))
            got = value_of(store.get(key))
            if got is not None and got not in written[key]:
                errors.append(f"{key}: read {got}, never written there")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert store.flush(timeout_s=30)
    assert not errors, errors[:5]
    store.close()
    with TieredStore(f"disk:{tmp_path}") as reopened:  # the disk holds exactly the last write of every key
        assert {key: value_of(reopened.get(key)) for key in final} == final
