"""One contract suite over every tier and over TieredStore combinations: they all behave as one store."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from kv_samples import key_of, make_chunk

from ragkv.codecs import get_codec
from ragkv.kvstore import (
    ConfigError,
    CorruptEntry,
    DeviceConfig,
    DiskConfig,
    HostConfig,
    RedisConfig,
    StoreConfig,
    TieredStore,
    encode_entry,
)
from ragkv.kvstore.tiers import make_tier

MB = 1 << 20


def _tier_configs(request: pytest.FixtureRequest, kind: str, capacity: int | None) -> list[Any]:
    if kind == "host":
        return [HostConfig(capacity_bytes=capacity)]
    if kind == "device":
        return [DeviceConfig(device="cpu", capacity_bytes=capacity)]
    if kind == "disk":
        path = request.getfixturevalue("tmp_path") / "disk"
        return [DiskConfig(path=str(path), capacity_bytes=capacity)]
    if kind == "redis":
        return [RedisConfig(url=request.getfixturevalue("redis_url"))]
    if kind == "cluster":
        return [RedisConfig(url=request.getfixturevalue("redis_cluster").url)]
    raise AssertionError(kind)


# Each target: (tier kinds fastest-first, write policy). Single kinds are bare tiers; lists are TieredStores.
TARGETS: dict[str, tuple[list[str], str | None]] = {
    "host": (["host"], None),
    "device-cpu": (["device"], None),
    "disk": (["disk"], None),
    "redis": (["redis"], None),
    "redis-cluster": (["cluster"], None),
    "store-host": (["host"], "write-through"),
    "store-host-disk": (["host", "disk"], "write-through"),
    "store-host-redis": (["host", "redis"], "write-through"),
    "store-device-host-disk-redis": (["device", "host", "disk", "redis"], "write-through"),
    "store-host-disk-writeback": (["host", "disk"], "write-back"),
    "store-host-cluster-writeback": (["host", "cluster"], "write-back"),
}
BOUNDED = {"host", "device-cpu", "disk", "store-host", "store-host-disk", "store-host-disk-writeback"}


@pytest.fixture(params=sorted(TARGETS))
def target(request: pytest.FixtureRequest) -> Callable[..., Any]:
    kinds, policy = TARGETS[request.param]
    opened: list[Any] = []

    def build(capacity: int | None = None) -> Any:
        configs = [c for k in kinds for c in _tier_configs(request, k, capacity)]
        obj = make_tier(configs[0]) if policy is None else TieredStore(StoreConfig(tiers=tuple(configs),
                                                                                   write_policy=policy))
        opened.append(obj)
        return obj

    build.name = request.param  # type: ignore[attr-defined]
    yield build
    for obj in opened:
        obj.close()


def settle(store: Any) -> None:
    if isinstance(store, TieredStore):
        assert store.flush(timeout_s=30)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_exact(target: Callable[..., Any], dtype: torch.dtype) -> None:
    store = target()
    chunk = make_chunk(1, dtype=dtype)
    key = key_of(chunk)
    assert store.get(key) is None
    store.put(key, chunk)
    settle(store)
    got = store.get(key)
    assert got is not None
    assert got.kv.dtype == dtype
    assert got.meta == chunk.meta
    assert torch.equal(got.kv.cpu(), chunk.kv)


def test_contains_delete_overwrite(target: Callable[..., Any]) -> None:
    store = target()
    a, b = make_chunk(2), make_chunk(3)
    key = key_of(a)
    assert not store.contains(key)
    store.put(key, a)
    settle(store)
    assert store.contains(key)
    store.put(key, b)  # overwrite: the same key now holds b
    settle(store)
    assert torch.equal(store.get(key).kv.cpu(), b.kv)
    assert store.delete(key) is True
    settle(store)
    assert not store.contains(key)
    assert store.get(key) is None
    assert store.delete(key) is False


def test_keys_by_namespace(target: Callable[..., Any]) -> None:
    store = target()
    chunks = [make_chunk(10 + i) for i in range(4)]
    keys_a = [key_of(c, "tenant-a") for c in chunks[:2]]
    keys_b = [key_of(c, "tenant-b") for c in chunks[2:]]
    for k, c in zip(keys_a + keys_b, chunks):
        store.put(k, c)
    settle(store)
    assert sorted(store.keys("tenant-a")) == sorted(keys_a)
    assert sorted(store.keys("tenant-b")) == sorted(keys_b)
    assert set(keys_a + keys_b) <= set(store.keys())


def test_batched_operations(target: Callable[..., Any]) -> None:
    store = target()
    chunks = [make_chunk(20 + i) for i in range(6)]
    keys = [key_of(c) for c in chunks]
    store.put_many(list(zip(keys[:4], chunks[:4])))
    settle(store)
    got = store.get_many(keys)
    assert [g is not None for g in got] == [True] * 4 + [False] * 2
    for g, c in zip(got[:4], chunks[:4]):
        assert torch.equal(g.kv.cpu(), c.kv)
    assert store.contains_many(keys) == [True] * 4 + [False] * 2
    assert store.delete_many(keys) == 4


def test_ttl_expires(target: Callable[..., Any]) -> None:
    store = target()
    chunk, other = make_chunk(30), make_chunk(31)
    store.put(key_of(chunk), chunk, ttl_s=0.3)
    store.put(key_of(other), other)
    settle(store)
    assert store.get(key_of(chunk)) is not None
    time.sleep(0.45)
    assert store.get(key_of(chunk)) is None
    assert store.get(key_of(other)) is not None


def test_blobs_round_trip_and_invalid_blobs_are_refused(target: Callable[..., Any]) -> None:
    store = target()
    chunk = make_chunk(40)
    key = key_of(chunk)
    blob = encode_entry(chunk, get_codec("raw"))
    store.put_blob(key, blob)
    settle(store)
    assert torch.equal(store.get(key).kv.cpu(), chunk.kv)
    out = store.get_blob(key)
    assert out is not None and out[:4] == b"RGKV"
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x40
    other = key_of(make_chunk(41))
    with pytest.raises(CorruptEntry):
        store.put_blob(other, bytes(bad))
    with pytest.raises(CorruptEntry):
        store.put_blob(other, blob[:-3])
    settle(store)
    assert store.get(other) is None


@pytest.mark.parametrize("bad_key", ["", "no-namespace", "a:b:c", "t1:../../etc/passwd", "t1:sp ace", 42])
def test_malformed_keys_are_config_errors(target: Callable[..., Any], bad_key: Any) -> None:
    store = target()
    with pytest.raises(ConfigError):
        store.get(bad_key)
    with pytest.raises(ConfigError):
        store.put(bad_key, make_chunk(50))


def test_stats_count_hits_and_misses(target: Callable[..., Any]) -> None:
    store = target()
    chunk = make_chunk(60)
    store.put(key_of(chunk), chunk)
    settle(store)
    store.get(key_of(chunk))
    store.get(key_of(make_chunk(61)))
    if isinstance(store, TieredStore):
        stats = store.stats()
        assert stats["hits"] >= 1 and stats["misses"] >= 1
        assert set(stats["tiers"]) == set(store.names)
    else:
        stats = store.describe()
        assert stats["hits"] == 1 and stats["misses"] == 1
        assert stats["bytes_out"] >= chunk.nbytes
        assert stats["latency"]["get"]["count"] == 2


def test_eviction_keeps_capacity_and_pins_survive(target: Callable[..., Any]) -> None:
    if target.name not in BOUNDED:  # type: ignore[attr-defined]
        pytest.skip("Redis evicts by its own maxmemory policy; the tier does not bound capacity")
    chunk_bytes = make_chunk(0, tokens=64).nbytes
    capacity = chunk_bytes * 5 + chunk_bytes // 2  # room for 5 entries (+ container overhead on disk)
    store = target(capacity=capacity)
    chunks = [make_chunk(100 + i, tokens=64) for i in range(20)]
    pinned = key_of(chunks[0])
    store.put(pinned, chunks[0])
    store.pin(pinned)
    for c in chunks[1:]:
        store.put(key_of(c), c)
    settle(store)
    tiers = store.tiers if isinstance(store, TieredStore) else [store]
    for tier in tiers:
        assert tier.used_bytes() <= capacity, tier.kind
    assert store.get(pinned) is not None
    assert store.get(key_of(chunks[-1])) is not None
    present = sum(store.contains(key_of(c)) for c in chunks)
    assert 2 <= present <= 6


def test_concurrent_readers_and_writers(target: Callable[..., Any]) -> None:
    store = target()
    chunks = [make_chunk(200 + i) for i in range(8)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(24):
                c = chunks[(i + offset) % len(chunks)]
                store.put(key_of(c), c)
                got = store.get(key_of(chunks[(i * 3 + offset) % len(chunks)]))
                if got is not None:
                    assert torch.equal(got.kv.cpu(), chunks[(i * 3 + offset) % len(chunks)].kv)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    settle(store)
    for c in chunks:
        assert torch.equal(store.get(key_of(c)).kv.cpu(), c.kv)


def test_large_values(target: Callable[..., Any]) -> None:
    store = target()
    chunk = make_chunk(300, tokens=2048, layers=4, heads=4, dim=64)  # 8 MB of fp16
    assert chunk.nbytes == 8 * MB
    store.put(key_of(chunk), chunk)
    settle(store)
    assert torch.equal(store.get(key_of(chunk)).kv.cpu(), chunk.kv)


def test_async_forms_behave_as_the_blocking_ones(target: Callable[..., Any]) -> None:
    """aput / aget / aget_many / acontains / adelete: the same answers, many at once on one event loop."""
    store = target()
    chunks = [make_chunk(40 + i) for i in range(12)]
    keys = [key_of(c) for c in chunks]

    async def scenario() -> None:
        assert await store.aget(keys[0]) is None and not await store.acontains(keys[0])
        await asyncio.gather(*(store.aput(k, c) for k, c in zip(keys, chunks, strict=True)))
        settle(store)
        got = await asyncio.gather(*(store.aget(k) for k in keys))
        assert all(g is not None and torch.equal(g.kv.cpu(), c.kv) for g, c in zip(got, chunks, strict=True))
        many = await store.aget_many([keys[3], "t1:absent", keys[5]])
        assert many[1] is None and torch.equal(many[0].kv.cpu(), chunks[3].kv)
        assert torch.equal(many[2].kv.cpu(), chunks[5].kv)
        assert await store.acontains(keys[7])
        assert await store.adelete(keys[7]) and not await store.adelete(keys[7])
        settle(store)
        assert not await store.acontains(keys[7]) and await store.aget(keys[7]) is None

    asyncio.run(scenario())
