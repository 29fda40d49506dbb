"""TieredStore behaviour beyond the shared contract: promotion, write-back, prefetch, lifecycle."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from kv_samples import key_of, make_chunk

from ragkv.kvstore import DiskConfig, HostConfig, StoreConfig, TieredStore, chunk_key
from ragkv.kvstore.tiers import make_tier


def test_hit_in_slow_tier_is_promoted(tmp_path: Path) -> None:
    with TieredStore(f"host:1GB,disk:{tmp_path}") as store:
        c = make_chunk(1)
        store.tiers[1].put(key_of(c), c)  # only on disk
        assert store.locate(key_of(c)) == "disk"
        assert torch.equal(store.get(key_of(c)).kv, c.kv)
        assert store.locate(key_of(c)) == "host"
        assert store.stats()["promotions"] == 1


def test_promotion_can_be_turned_off(tmp_path: Path) -> None:
    cfg = StoreConfig(tiers=(HostConfig(), DiskConfig(path=str(tmp_path))), promote=False)
    with TieredStore(cfg) as store:
        c = make_chunk(2)
        store.tiers[1].put(key_of(c), c)
        assert store.get(key_of(c)) is not None
        assert store.locate(key_of(c)) == "disk"


def test_promotion_keeps_remaining_ttl(tmp_path: Path) -> None:
    with TieredStore(f"host,disk:{tmp_path}") as store:
        c = make_chunk(3)
        store.tiers[1].put(key_of(c), c, ttl_s=0.4)
        assert store.get(key_of(c)) is not None  # promoted with what is left of its TTL
        time.sleep(0.5)
        assert store.get(key_of(c)) is None
        assert not store.tiers[0].contains(key_of(c))


def test_write_back_is_readable_at_once_and_flushed_on_close(tmp_path: Path) -> None:
    chunks = [make_chunk(10 + i) for i in range(20)]
    cfg = StoreConfig(tiers=(HostConfig(capacity_bytes=chunks[0].nbytes * 2), DiskConfig(path=str(tmp_path))),
                      write_policy="write-back", write_queue_size=4)
    store = TieredStore(cfg)
    for c in chunks:
        store.put(key_of(c), c)
        assert store.get(key_of(c)) is not None  # readable immediately, whatever the queue holds
    store.close()  # drains the queue
    disk = make_tier(DiskConfig(path=str(tmp_path)))
    try:
        for c in chunks:
            got = disk.get(key_of(c))
            assert got is not None and torch.equal(got.kv, c.kv)
    finally:
        disk.close()


def test_delete_during_write_back_does_not_resurrect(tmp_path: Path) -> None:
    cfg = StoreConfig(tiers=(HostConfig(), DiskConfig(path=str(tmp_path))), write_policy="write-back")
    with TieredStore(cfg) as store:
        for i in range(30):
            c = make_chunk(100 + i)
            store.put(key_of(c), c)
            store.delete(key_of(c))
        store.flush()
        assert list(store.keys()) == []


def test_get_many_mixes_tiers_and_misses(tmp_path: Path) -> None:
    with TieredStore(f"host,disk:{tmp_path}") as store:
        chunks = [make_chunk(200 + i) for i in range(6)]
        for i, c in enumerate(chunks):
            (store.tiers[i % 2]).put(key_of(c), c)
        keys = [key_of(c) for c in chunks] + [chunk_key("test-model", "t1", [9, 9, 9])]
        got = store.get_many(keys)
        assert got[-1] is None
        for g, c in zip(got, chunks):
            assert torch.equal(g.kv, c.kv)
        futures = store.prefetch(keys[:2])
        assert all(f.result() is not None for f in futures)


def test_store_from_tier_objects_and_repr(tmp_path: Path) -> None:
    tiers = [make_tier(HostConfig()), make_tier(HostConfig())]
    with TieredStore(tiers) as store:
        assert store.names == ["host", "host2"]
        assert "write-through" in repr(store)


def test_closing_twice_is_harmless(tmp_path: Path) -> None:
    store = TieredStore("host")
    store.close()
    store.close()


def test_invalid_ttl() -> None:
    from ragkv.kvstore import ConfigError

    with TieredStore("host") as store, pytest.raises(ConfigError):
        store.put(key_of(make_chunk(1)), make_chunk(1), ttl_s=0)


def test_explicit_promotion_from_a_named_tier(tmp_path: Path) -> None:
    from ragkv.kvstore import ConfigError

    with TieredStore(f"host,disk:{tmp_path}") as store:
        c = make_chunk(300)
        store.tiers[1].put(key_of(c), c)
        store.promote(key_of(c), c, "disk")
        assert store.locate(key_of(c)) == "host"
        assert store.stats()["promotions"] == 1
        with pytest.raises(ConfigError, match="unknown tier"):
            store.promote(key_of(c), c, "tape")
