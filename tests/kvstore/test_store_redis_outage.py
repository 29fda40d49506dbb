"""A TieredStore with Redis behind local tiers: Redis killed mid-run, then restarted. Callers see no exception,
local tiers keep serving what they hold, writes keep landing locally, and Redis serves again after restart."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from kv_samples import key_of, make_chunk

from ragkv.kvstore import RedisConfig, StoreConfig, TieredStore
from ragkv.kvstore.tiers import DiskConfig, HostConfig


def test_local_tiers_keep_serving_through_a_redis_outage(fresh_redis_server, tmp_path: Path) -> None:
    config = StoreConfig(tiers=(
        HostConfig(capacity_bytes=make_chunk(0).nbytes * 4),
        DiskConfig(path=str(tmp_path / "disk")),
        RedisConfig(url=fresh_redis_server.url, breaker_failures=2, breaker_backoff_base_s=0.2,
                    breaker_backoff_cap_s=0.5, socket_timeout_s=0.5, connect_timeout_s=0.2),
    ))
    before = [make_chunk(i) for i in range(8)]
    during = [make_chunk(100 + i) for i in range(8)]
    with TieredStore(config) as store:
        for c in before:
            store.put(key_of(c), c)
        assert store.tiers[2].contains(key_of(before[0]))

        fresh_redis_server.kill()
        for c in during:  # writes land in host and disk; the Redis copy is dropped and counted, no exception
            store.put(key_of(c), c)
        for c in before + during:
            got = store.get(key_of(c))
            assert got is not None and torch.equal(got.kv, c.kv)
        assert store.get(key_of(make_chunk(999))) is None  # a real miss is still just a miss
        assert store.stats()["tiers"]["redis"]["errors"] >= 1

        fresh_redis_server.restart()
        key = key_of(make_chunk(500))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the breaker retries after its back-off
            store.put(key, make_chunk(500))
            if store.tiers[2].contains(key):
                break
            time.sleep(0.1)
        assert store.tiers[2].contains(key), "the Redis tier did not reconnect after the restart"
        assert torch.equal(store.tiers[2].get(key).kv, make_chunk(500).kv)
