"""The hostile blob corpus (every codec) through every store read path: the container, each tier's
``get``/``get_blob``/``put_blob``, and the TieredStore. Each blob ends as a miss or a ``CorruptEntry``
(never another exception), with bounded memory, and nothing corrupt stays stored."""
from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import pytest
from blob_corpus import good_blob, hostile_blobs
from redis_servers import raw_redis_client

from ragkv.kvstore import CorruptEntry, DiskConfig, HostConfig, RedisConfig, TieredStore, decode_entry
from ragkv.kvstore.header_schema import EntryLimits
from ragkv.kvstore.tiers import make_tier

LIMITS = EntryLimits(max_elements=1 << 22)
CORPUS = hostile_blobs()
GROWTH_BOUND = 96 << 20


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def decodes(blob: bytes, key: str) -> bool:
    """True if the blob decoded (a bit flip that leaves a valid entry), False if refused as CorruptEntry."""
    try:
        decode_entry(blob, LIMITS, key)
    except CorruptEntry:
        return False
    return True


def test_container_and_codecs_refuse_the_corpus_within_bounded_memory() -> None:
    before = max_rss()
    accepted = [name for name, key, blob in CORPUS if decodes(blob, key)]
    assert all(" flip " in name for name in accepted)  # only a lucky flip in a payload value may decode
    assert max_rss() - before < GROWTH_BOUND


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_local_tiers_refuse_or_miss_the_corpus(tmp_path: Path, kind: str) -> None:
    config = HostConfig() if kind == "host" else DiskConfig(path=str(tmp_path), fsync=False)
    tier = make_tier(config)
    tier.limits = LIMITS
    before = max_rss()
    for name, key, blob in CORPUS:
        try:
            tier.put_blob(key, blob)
        except CorruptEntry:
            assert not tier.contains(key), name
            continue
        tier.get(key)  # a stored blob whose payload turns out bad is a miss and is deleted
        tier.get_blob(key)
        tier.delete(key)
    assert max_rss() - before < GROWTH_BOUND
    tier.close()


def test_planted_files_are_misses_and_deleted(tmp_path: Path) -> None:
    with TieredStore(f"host,disk:{tmp_path}") as store:
        store.limit_entries(LIMITS.max_elements)
        disk = store.tiers[1]
        for name, key, blob in CORPUS:
            path = Path(disk.path_for(key))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            if store.get(key) is None:
                assert not path.exists(), name
            store.delete(key)


@pytest.mark.redis
def test_redis_values_are_misses_and_deleted(redis_url: str) -> None:
    tier = make_tier(RedisConfig(url=redis_url, key_prefix="ragkv-corpus:"))
    tier.limits = LIMITS
    raw: Any = raw_redis_client(redis_url)
    try:
        for name, key, blob in CORPUS:
            raw.set("ragkv-corpus:" + key, blob)
            got = tier.get(key)
            if got is None:
                assert not raw.exists("ragkv-corpus:" + key), name
            raw.delete("ragkv-corpus:" + key)
            raw.set("ragkv-corpus:" + key, blob)
            if tier.get_blob(key) is None:
                assert not raw.exists("ragkv-corpus:" + key), name
            raw.delete("ragkv-corpus:" + key)
    finally:
        tier.close()
        raw.close()


def test_the_corpus_starts_from_valid_blobs() -> None:
    key, blob = good_blob("cachegen", {})
    assert decodes(blob, key)
    assert len(CORPUS) > 100
