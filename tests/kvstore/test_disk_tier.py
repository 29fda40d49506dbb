"""The disk tier on real files: round trips, layout, capacity and eviction, TTL, persistence, blobs, errors."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from ragkv.kvstore import (
    ChunkKV,
    ChunkMeta,
    ConfigError,
    CorruptEntry,
    TierUnavailable,
    encode_entry,
    read_header,
)
from ragkv.kvstore.tiers import make_tier, tier_class
from ragkv.kvstore.tiers.disk import STALE_TMP_AGE_S, DiskConfig, DiskTier, name_hash


def make_chunk(seed: int, tokens: int = 8, dtype: torch.dtype = torch.float16, layers: int = 2) -> ChunkKV:
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, 2, tokens, 16, generator=gen).to(dtype)  # kv: [L, 2, H, T, D]
    meta = ChunkMeta("fp-test", tuple(range(seed, seed + tokens)), position=seed,
                     dtype={torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype])
    return ChunkKV(kv, meta)


def key(i: int, namespace: str = "ns") -> str:
    return f"{namespace}:{i:040x}"


def entry_size(chunk: ChunkKV, tier: DiskTier) -> int:
    return len(encode_entry(chunk, tier.codec, key=key(0)))  # every key(i) has the same length


def open_tier(path: Path, **kwargs: object) -> DiskTier:
    kwargs.setdefault("fsync", False)  # fsync is exercised by the tests that pass fsync=True
    return DiskTier(DiskConfig(path=str(path), **kwargs))  # type: ignore[arg-type]


def entry_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.kv"))


# -- config ------------------------------------------------------------------------------------------------------
def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="path"):
        DiskConfig()
    with pytest.raises(ConfigError, match="path"):
        DiskConfig(path="  ")
    with pytest.raises(ConfigError, match="True or False"):
        DiskConfig(path=str(tmp_path), fsync="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rescan_interval_s"):
        DiskConfig(path=str(tmp_path), rescan_interval_s=-1)
    with pytest.raises(ConfigError, match="allowed"):
        DiskConfig(path=str(tmp_path), eviction="random")
    assert DiskConfig(path=tmp_path).path == str(tmp_path)  # type: ignore[arg-type]  # PathLike accepted


def test_registered_and_built_from_config(tmp_path: Path) -> None:
    assert tier_class("disk") is DiskTier
    tier = make_tier(DiskConfig(path=str(tmp_path / "made")))
    assert isinstance(tier, DiskTier) and tier.holds_encoded and tier.kind == "disk"
    assert (tmp_path / "made").is_dir()


def test_path_that_is_a_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(TierUnavailable):
        open_tier(tmp_path / "file")


# -- round trips and layout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    tier = open_tier(tmp_path, fsync=True)
    chunk = make_chunk(3, dtype=dtype)
    tier.put(key(1), chunk)
    got = tier.get(key(1))
    assert got is not None and got.equals(chunk) and got.kv.dtype == dtype
    assert tier.get(key(2)) is None
    stats = tier.stats.snapshot()
    size = entry_size(chunk, tier)
    assert (stats["hits"], stats["misses"], stats["puts"]) == (1, 1, 1)
    assert stats["bytes_in"] == stats["bytes_out"] == size == tier.used_bytes()


def test_file_layout_is_the_container_blob(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    chunk = make_chunk(1)
    tier.put("tenant-a:not.hex_name", chunk)
    h = name_hash("not.hex_name")
    path = tmp_path / "tenant-a" / h[0:2] / h[2:4] / "not.hex_name.kv"
    assert Path(tier.path_for("tenant-a:not.hex_name")) == path and path.is_file()
    assert path.read_bytes() == tier.get_blob("tenant-a:not.hex_name") == encode_entry(chunk, tier.codec, key="tenant-a:not.hex_name")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["not.hex_name.kv"]  # no temp file left


def test_dot_namespaces_are_refused_before_touching_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tier = open_tier(root)
    for i, ns in enumerate([".", ".."]):
        with pytest.raises(ConfigError):
            tier.put(f"{ns}:abc", make_chunk(i))
    tier.put("...x:..y", make_chunk(3))  # dots inside a name are fine
    for path in entry_files(tmp_path):
        assert root in path.parents
    assert set(open_tier(root).keys()) == {"...x:..y"}


def test_invalid_key_is_refused(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    for bad in ["no-namespace", "a:b:c", "ns:../../etc", "ns:a/b", ":x"]:
        with pytest.raises(ConfigError):
            tier.put(bad, make_chunk(0))
        with pytest.raises(ConfigError):
            tier.get(bad)


def test_keys_delete_contains(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    for i in range(3):
        tier.put(key(i, "a"), make_chunk(i))
    tier.put(key(9, "b"), make_chunk(9))
    assert sorted(tier.keys("a")) == [key(i, "a") for i in range(3)]
    assert list(tier.keys("b")) == [key(9, "b")]
    assert len(list(tier.keys())) == 4 and list(tier.keys("c")) == []
    assert tier.contains(key(1, "a")) and not tier.contains(key(5, "a"))
    assert tier.delete(key(1, "a")) and not tier.delete(key(1, "a"))
    assert not tier.contains(key(1, "a")) and tier.get(key(1, "a")) is None
    assert not Path(tier.path_for(key(1, "a"))).exists()
    assert tier.used_bytes() == 3 * entry_size(make_chunk(0), tier)
    assert tier.stats.snapshot()["deletes"] == 1


def test_overwrite_replaces_and_accounts_once(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    tier.put(key(1), make_chunk(1, tokens=8))
    tier.put(key(1), make_chunk(2, tokens=16))
    got = tier.get(key(1))
    assert got is not None and got.equals(make_chunk(2, tokens=16))
    assert tier.used_bytes() == entry_size(make_chunk(2, tokens=16), tier)
    assert len(entry_files(tmp_path)) == 1


# -- TTL ---------------------------------------------------------------------------------------------------------
def test_ttl_expiry_deletes_the_file(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    tier.put(key(1), make_chunk(1), ttl_s=0.05)
    tier.put(key(2), make_chunk(2), ttl_s=60)
    assert tier.get(key(1)) is not None
    time.sleep(0.08)
    assert tier.get(key(1)) is None
    assert not Path(tier.path_for(key(1))).exists()
    assert tier.stats.snapshot()["expired"] == 1
    assert tier.get(key(2)) is not None
    assert list(tier.keys()) == [key(2)]
    with pytest.raises(ConfigError):
        tier.put(key(3), make_chunk(3), ttl_s=0)


def test_expired_entry_found_by_another_instance(tmp_path: Path) -> None:
    writer = open_tier(tmp_path)
    writer.put(key(1), make_chunk(1), ttl_s=0.05)
    time.sleep(0.08)
    reader = open_tier(tmp_path)  # index built from the directory: expiry unknown until read
    assert reader.get(key(1)) is None and reader.stats.snapshot()["expired"] == 1
    assert entry_files(tmp_path) == []
    writer.put(key(2), make_chunk(2), ttl_s=0.05)
    time.sleep(0.08)
    assert not writer.contains(key(2)) and entry_files(tmp_path) == []


# -- capacity, eviction, pinning -----------------------------------------------------------------------------------
def test_eviction_keeps_used_bytes_within_capacity(tmp_path: Path) -> None:
    probe = open_tier(tmp_path / "probe")
    size = entry_size(make_chunk(0), probe)
    cap = 5 * size + size // 2
    tier = open_tier(tmp_path / "store", capacity_bytes=cap)
    for i in range(60):
        tier.put(key(i), make_chunk(i))
        assert tier.used_bytes() <= cap
        assert sum(p.stat().st_size for p in entry_files(tmp_path / "store")) <= cap
    assert sorted(tier.keys()) == [key(i) for i in range(55, 60)]  # LRU with no reads: the newest stay
    assert tier.stats.snapshot()["evictions"] == 55
    assert tier.get(key(59)) is not None and tier.get(key(0)) is None


def test_lru_read_refreshes_and_fifo_does_not(tmp_path: Path) -> None:
    size = entry_size(make_chunk(0), open_tier(tmp_path / "probe"))
    for policy, survivor in [("lru", key(0)), ("fifo", key(1))]:
        tier = open_tier(tmp_path / policy, capacity_bytes=3 * size, eviction=policy)
        for i in range(3):
            tier.put(key(i), make_chunk(i))
        assert tier.get(key(0)) is not None
        tier.put(key(3), make_chunk(3))
        assert survivor in set(tier.keys()) and len(list(tier.keys())) == 3, policy


def test_pinned_entry_survives_eviction(tmp_path: Path) -> None:
    size = entry_size(make_chunk(0), open_tier(tmp_path / "probe"))
    tier = open_tier(tmp_path / "store", capacity_bytes=3 * size)
    tier.put(key(0), make_chunk(0))
    tier.pin(key(0))
    for i in range(1, 20):
        tier.put(key(i), make_chunk(i))
        assert tier.used_bytes() <= 3 * size
    assert tier.contains(key(0)) and tier.get(key(0)) is not None
    tier.unpin(key(0))
    for i in range(20, 23):
        tier.put(key(i), make_chunk(i))
    assert not tier.contains(key(0))


def test_entry_that_cannot_fit_is_not_stored(tmp_path: Path) -> None:
    size = entry_size(make_chunk(0), open_tier(tmp_path / "probe"))
    tier = open_tier(tmp_path / "store", capacity_bytes=2 * size)
    tier.put(key(1), make_chunk(1, tokens=64))  # larger than the whole tier
    assert not tier.contains(key(1)) and entry_files(tmp_path / "store") == []
    tier.put(key(2), make_chunk(2))
    tier.pin(key(2))
    tier.put(key(3), make_chunk(3))
    tier.pin(key(3))
    tier.put(key(4), make_chunk(4))  # everything else is pinned: refused, the pins stay
    assert sorted(tier.keys()) == [key(2), key(3)] and tier.used_bytes() == 2 * size


def test_capacity_shared_by_two_instances_is_refreshed_from_the_directory(tmp_path: Path) -> None:
    """Two tiers on one directory stand in for two processes: each only knows its own writes until the
    over-capacity put rescans, after which the directory as a whole fits the capacity."""
    size = entry_size(make_chunk(0), open_tier(tmp_path / "probe"))
    a = open_tier(tmp_path / "shared", capacity_bytes=4 * size, rescan_interval_s=0.0)
    b = open_tier(tmp_path / "shared", capacity_bytes=4 * size, rescan_interval_s=0.0)
    for i in range(3):
        a.put(key(i, "a"), make_chunk(i))
        b.put(key(i, "b"), make_chunk(i))
    assert len(entry_files(tmp_path / "shared")) == 6  # neither has gone over its own view yet
    b.put(key(3, "b"), make_chunk(3))
    b.put(key(4, "b"), make_chunk(4))
    files = entry_files(tmp_path / "shared")
    assert sum(p.stat().st_size for p in files) <= 4 * size and b.used_bytes() <= 4 * size
    assert b.get(key(4, "b")) is not None
    # whatever b evicted of a's entries reads as a miss in a (its index is stale), never as an error
    for i in range(3):
        got = a.get(key(i, "a"))
        assert got is None or got.equals(make_chunk(i))
    assert a.stats.snapshot()["errors"] == 0


# -- persistence -----------------------------------------------------------------------------------------------------
def test_persistence_across_reopen(tmp_path: Path) -> None:
    tier = open_tier(tmp_path, fsync=True)
    chunks = {key(i, ns): make_chunk(i, dtype=dt) for i, (ns, dt) in
              enumerate([("a", torch.float16), ("a", torch.bfloat16), ("b", torch.float32)])}
    for k, c in chunks.items():
        tier.put(k, c)
    blobs = {k: tier.get_blob(k) for k in chunks}
    used = tier.used_bytes()
    tier.close()
    reopened = open_tier(tmp_path)
    assert sorted(reopened.keys()) == sorted(chunks) and reopened.used_bytes() == used
    assert sorted(reopened.keys("a")) == sorted(k for k in chunks if k.startswith("a:"))
    for k, c in chunks.items():
        assert reopened.get_blob(k) == blobs[k]
        got = reopened.get(k)
        assert got is not None and got.equals(c)


def test_reopen_uses_mtime_as_recency(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    size = entry_size(make_chunk(0), tier)
    now = time.time()
    for i, age_s in enumerate([30, 10, 20]):  # key 0 is the oldest, then key 2
        tier.put(key(i), make_chunk(i))
        os.utime(tier.path_for(key(i)), (now - age_s, now - age_s))
    reopened = open_tier(tmp_path, capacity_bytes=3 * size)
    reopened.put(key(3), make_chunk(3))
    assert sorted(reopened.keys()) == [key(1), key(2), key(3)]
    reopened.put(key(4), make_chunk(4))
    assert sorted(reopened.keys()) == [key(1), key(3), key(4)]


def test_startup_sweeps_stale_temp_files_only(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    tier.put(key(1), make_chunk(1))
    directory = Path(tier.path_for(key(1))).parent
    stale, young = directory / ".123-456-0-abcd.tmp", directory / ".789-1-0-ef01.tmp"
    stale.write_bytes(b"partial")
    young.write_bytes(b"partial")
    old = time.time() - STALE_TMP_AGE_S - 60
    os.utime(stale, (old, old))
    (tmp_path / "unrelated.txt").write_text("not ours")
    (directory / "README").write_text("not ours either")
    misplaced = tmp_path / "ns" / "zz" / "zz" / "misplaced.kv"  # not where path_for puts "ns:misplaced"
    misplaced.parent.mkdir(parents=True)
    misplaced.write_bytes(Path(tier.path_for(key(1))).read_bytes())
    reopened = open_tier(tmp_path)
    assert not stale.exists() and young.exists()
    assert list(reopened.keys()) == [key(1)]
    assert (tmp_path / "unrelated.txt").exists() and (directory / "README").exists() and misplaced.exists()


def test_entry_written_by_another_instance_is_read(tmp_path: Path) -> None:
    reader = open_tier(tmp_path)
    writer = open_tier(tmp_path)
    writer.put(key(7), make_chunk(7))
    assert reader.contains(key(7))
    got = reader.get(key(7))
    assert got is not None and got.equals(make_chunk(7))
    assert list(reader.keys()) == [key(7)] and reader.used_bytes() == writer.used_bytes()
    writer.delete(key(7))
    assert reader.get(key(7)) is None and reader.used_bytes() == 0


# -- blobs -----------------------------------------------------------------------------------------------------------
def test_get_blob_put_blob(tmp_path: Path) -> None:
    src, dst = open_tier(tmp_path / "src"), open_tier(tmp_path / "dst")
    chunk = make_chunk(5, dtype=torch.bfloat16)
    src.put(key(5), chunk)
    blob = src.get_blob(key(5))
    assert isinstance(blob, bytes)
    dst.put_blob(key(5), blob)
    assert Path(dst.path_for(key(5))).read_bytes() == blob
    got = dst.get(key(5))
    assert got is not None and got.equals(chunk)
    assert src.get_blob(key(6)) is None

    with pytest.raises(CorruptEntry, match="written under key"):
        dst.put_blob(key(8), blob)  # a blob is bound to the key it was written under
    assert dst.get(key(8)) is None
    dst.put_blob(key(5), blob, ttl_s=60)
    stored = dst.get_blob(key(5))
    assert stored is not None and read_header(stored).expires_at is not None
    assert read_header(stored).expires_at > time.time() + 50  # type: ignore[operator]


def test_put_blob_refuses_invalid_blobs(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    blob = encode_entry(make_chunk(1), tier.codec)
    for bad in [b"", b"garbage" * 10, blob[:-1], blob[:10] + bytes([blob[10] ^ 1]) + blob[11:]]:
        with pytest.raises(CorruptEntry):
            tier.put_blob(key(1), bad)
    assert entry_files(tmp_path) == [] and tier.used_bytes() == 0 and list(tier.keys()) == []


def test_put_blob_already_expired_is_not_stored(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    blob = encode_entry(make_chunk(1), tier.codec, expires_at=time.time() - 1)
    tier.put_blob(key(1), blob)
    assert entry_files(tmp_path) == []


# -- batched reads ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
def test_get_many(tmp_path: Path, threads: int) -> None:
    tier = open_tier(tmp_path)
    tier.get_many_threads = threads
    for i in range(0, 10, 2):
        tier.put(key(i), make_chunk(i))
    got = tier.get_many([key(i) for i in range(10)])
    for i, chunk in enumerate(got):
        assert (chunk is None) == (i % 2 == 1)
        assert chunk is None or chunk.equals(make_chunk(i))
    stats = tier.stats.snapshot()
    assert (stats["hits"], stats["misses"]) == (5, 5)
    tier.close()


# -- backend errors --------------------------------------------------------------------------------------------------
def test_unwritable_location_drops_the_put_and_reads_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A path component that is a file stands in for a failing disk (tests may run as root, where
    permission bits do not stop writes)."""
    tier = open_tier(tmp_path)
    (tmp_path / "blocked").write_bytes(b"")
    tier.put(key(1, "blocked"), make_chunk(1))  # must not raise
    assert tier.get(key(1, "blocked")) is None
    assert not tier.contains(key(1, "blocked")) and not tier.delete(key(1, "blocked"))
    stats = tier.stats.snapshot()
    assert stats["errors"] >= 2 and stats["puts"] == 0 and stats["misses"] == 1
    assert "dropped the write" in caplog.text


def test_entry_path_that_is_a_directory_reads_as_a_miss(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    os.makedirs(tier.path_for(key(1)))
    assert tier.get(key(1)) is None and tier.get_blob(key(1)) is None
    assert tier.stats.snapshot()["errors"] == 2
    tier.put(key(1), make_chunk(1))  # os.replace onto a directory fails: dropped, counted
    assert tier.stats.snapshot()["errors"] == 3
    assert not [p for p in Path(tier.path_for(key(1))).parent.iterdir() if p.name.endswith(".tmp")]
