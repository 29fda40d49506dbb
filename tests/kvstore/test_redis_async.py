"""The Redis tier's native asyncio path: one client per event loop, the same breaker, misses and corruption
handling as the blocking path, and many lookups in flight on one loop without a thread each."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from redis_servers import free_port, raw_redis_client

from ragkv.kvstore import ChunkKV, ChunkMeta
from ragkv.kvstore.tiers.redis_async import RedisAsyncAPI
from ragkv.kvstore.tiers.redis_tier import RedisTier

FAST_BREAKER = {"breaker_failures": 2, "breaker_backoff_base_s": 0.1, "breaker_backoff_cap_s": 0.2,
                "connect_timeout_s": 0.2, "socket_timeout_s": 0.2}


def _chunk(seed: int, tokens: int = 16) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 2, 2, tokens, 8, generator=g).to(torch.float16)
    return ChunkKV(kv, ChunkMeta("fp", tuple(range(seed, seed + tokens)), position=1, dtype="float16"))


@pytest.mark.parametrize("deployment", ["single", "cluster"])
def test_async_io_runs_on_the_loop_with_a_client_per_loop(deployment: str, request: pytest.FixtureRequest,
                                                         make_redis_tier: Callable[..., RedisTier]) -> None:
    url = str(request.getfixturevalue("redis_url" if deployment == "single" else "redis_cluster_url"))
    tier = make_redis_tier(url)
    assert type(tier).aget is RedisAsyncAPI.aget and type(tier).aput is RedisAsyncAPI.aput
    chunks = {f"ns:c{i}": _chunk(i) for i in range(40)}
    threads_before = threading.active_count()

    async def scenario() -> int:
        await asyncio.gather(*(tier.aput(k, c) for k, c in chunks.items()))
        got = await asyncio.gather(*(tier.aget(k) for k in chunks))
        assert all(torch.equal(g.kv, c.kv) for g, c in zip(got, chunks.values(), strict=True))
        many = await tier.aget_many([*chunks, "ns:absent"])
        assert many[-1] is None and all(m is not None for m in many[:-1])
        assert await tier.acontains("ns:c3") and await tier.adelete("ns:c3") and not await tier.acontains("ns:c3")
        return len(tier._aclients)

    assert asyncio.run(scenario()) == 1
    assert asyncio.run(_count(tier)) == 1
    assert threading.active_count() - threads_before <= 8  # decode offload uses the loop's small pool
    assert tier.get("ns:c5") is not None and tier.get("ns:c3") is None  # the blocking path sees the same data


async def _count(tier: RedisTier) -> int:
    await tier.acontains("ns:c0")
    return sum(1 for loop in tier._aclients if not loop.is_closed())  # a new loop, its own client


def test_async_reads_of_a_corrupt_value_miss_and_delete_it(redis_url: str,
                                                           make_redis_tier: Callable[..., RedisTier]) -> None:
    tier = make_redis_tier(redis_url)
    tier.put("ns:a", _chunk(1))
    raw = raw_redis_client(redis_url)
    try:
        rkey = tier.config.key_prefix + "ns:a"
        raw.set(rkey, raw.get(rkey)[:-3])
        assert asyncio.run(tier.aget("ns:a")) is None
        assert raw.exists(rkey) == 0 and tier.stats.snapshot()["corrupt"] == 1
    finally:
        raw.close()


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_nothing_listening_is_a_miss_in_async_form_too(scheme: str, make_redis_tier: Callable[..., Any]) -> None:
    ports = [free_port() for _ in range(3 if scheme == "redis+cluster" else 1)]
    url = f"{scheme}://" + ",".join(f"127.0.0.1:{p}" for p in ports) + ("/0" if scheme == "redis" else "")
    tier = make_redis_tier(url, **FAST_BREAKER)

    async def scenario() -> None:
        for _ in range(4):
            assert await tier.aget("ns:a") is None
            await tier.aput("ns:a", _chunk(2))
            assert not await tier.acontains("ns:a") and not await tier.adelete("ns:a")
            assert await tier.aget_many(["ns:a", "ns:b"]) == [None, None]

    asyncio.run(scenario())
    stats = tier.stats.snapshot()
    assert stats["puts"] == 0 and stats["errors"] >= 4 and tier.breaker.times_opened >= 1


def test_a_store_reads_redis_on_the_loop_and_promotes_only_current_values(redis_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from ragkv.kvstore import TieredStore

    with TieredStore(f"host:64MB,{redis_url}") as store:
        host, redis = store.tiers
        old, new = _chunk(1), _chunk(2)
        store.put("ns:a", old)
        host.delete("ns:a")

        def blocking(*_: Any) -> None:
            raise AssertionError("the blocking Redis path was used")

        monkeypatch.setattr(redis, "get_blob", blocking)
        got = asyncio.run(store.aget("ns:a"))
        assert got is not None and torch.equal(got.kv, old.kv)
        assert torch.equal(host.get("ns:a").kv, old.kv)  # promoted into the host tier
        many = asyncio.run(store.aget_many(["ns:a", "ns:absent"]))
        assert many[1] is None and torch.equal(many[0].kv, old.kv)
        host.delete("ns:a")
        generation = store._generation("ns:a")  # a read begins ...
        monkeypatch.undo()
        store.put("ns:a", new)  # ... a write lands before its promotion ...
        store._promote_unless_changed("ns:a", 1, old, None, None, generation)
        assert torch.equal(host.get("ns:a").kv, new.kv)  # ... and the older value is not promoted over it
