"""The redis tier against real servers: one redis-server and a 3-master cluster (support/redis_servers.py)."""
from __future__ import annotations

import ast
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from redis_servers import raw_redis_client

from ragkv.kvstore import ChunkKV, ChunkMeta, ConfigError, CorruptEntry, encode_entry, read_header
from ragkv.kvstore.tiers import make_tier, tier_class
from ragkv.kvstore.tiers.redis_client import import_redis, parse_redis_url
from ragkv.kvstore.tiers.redis_tier import RedisConfig, RedisTier

MB = 1 << 20
TIERS_DIR = Path(__file__).resolve().parents[2] / "kvstore" / "tiers"


def sample_chunk(seed: int, tokens: int = 16, layers: int = 2, heads: int = 2, dim: int = 8) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=g).to(torch.float16)  # kv: [L, 2, H, T, D]
    ids = tuple(int(x) for x in torch.randint(0, 50_000, (tokens,), generator=g))
    return ChunkKV(kv, ChunkMeta(fingerprint="redis-test", token_ids=ids, position=seed))


@pytest.fixture(params=["single", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    """Every behaviour test runs on one server and on the cluster, each emptied first."""
    return str(request.getfixturevalue("redis_url" if request.param == "single" else "redis_cluster_url"))


@pytest.fixture
def tier(url: str, make_redis_tier: Callable[..., RedisTier]) -> RedisTier:
    return make_redis_tier(url)


@pytest.fixture
def raw(url: str) -> Any:
    client = raw_redis_client(url)
    yield client
    client.close()


# -- configuration and packaging --------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"url": "http://127.0.0.1:6379"}, "allowed schemes: ['redis', 'redis+cluster', 'rediss', 'rediss+cluster']"),
    ({"url": "redis://a:1,b:2"}, "redis+cluster://"),
    ({"url": "redis://127.0.0.1:70000/0"}, "invalid host:port"),
    ({"url": "redis+cluster://127.0.0.1:7000/1"}, "only database 0"),
    ({"key_prefix": "rag*"}, "[A-Za-z0-9._:{}/-]"),
    ({"socket_timeout_s": 0}, "socket_timeout_s must be"),
    ({"connect_timeout_s": -1.0}, "connect_timeout_s must be"),
    ({"default_ttl_s": 0}, "default_ttl_s must be None"),
    ({"breaker_failures": 0}, "breaker_failures must be an integer >= 1"),
    ({"breaker_backoff_base_s": 2.0, "breaker_backoff_cap_s": 1.0}, "breaker_backoff_cap_s must be >="),
    ({"max_value_bytes": 0}, "max_value_bytes must be an integer in [1,"),
    ({"codec": "no-such-codec"}, "no-such-codec"),
])
def test_config_errors_name_the_allowed_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        RedisConfig(**overrides)
    assert message in str(info.value)


def test_config_accepts_the_documented_urls_and_redacts_passwords() -> None:
    single = parse_redis_url("redis://user:s3cret@cache.local:6380/2")
    assert (single.cluster, single.nodes, single.db, single.username, single.password) == (
        False, (("cache.local", 6380),), 2, "user", "s3cret")
    cluster = parse_redis_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001,[::1]:7002")
    assert cluster.cluster and cluster.nodes == (("127.0.0.1", 7000), ("127.0.0.1", 7001), ("::1", 7002))
    tier = RedisTier(RedisConfig(url="redis://user:s3cret@127.0.0.1:1/0"))  # constructing never connects
    assert "s3cret" not in tier.describe()["url"] and tier_class("redis") is RedisTier
    assert type(make_tier(RedisConfig(url="redis://127.0.0.1:1/0"))) is RedisTier


def test_redis_py_is_imported_lazily_and_its_absence_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("redis_tier.py", "redis_client.py", "redis_breaker.py"):
        tree = ast.parse((TIERS_DIR / name).read_text())
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        imported = {a.name for n in top_level if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m == "redis" or m.startswith("redis.")}, name
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    with pytest.raises(ConfigError, match=r"pip install ragkv\[redis\]"):
        import_redis()
    with pytest.raises(ConfigError, match=r"pip install ragkv\[redis\]"):
        RedisTier(RedisConfig(url="redis://127.0.0.1:1/0"))


# -- single-key operations ----------------------------------------------------------------------------------
def test_put_get_delete_contains_keys(tier: RedisTier, raw: Any) -> None:
    a, b, c = sample_chunk(1), sample_chunk(2), sample_chunk(3)
    tier.put("ns1:a", a)
    tier.put("ns1:b", b)
    tier.put("ns2:c", c)
    assert raw.exists("ragkv:ns1:a", "ragkv:ns1:b", "ragkv:ns2:c") == 3  # one key per entry, prefixed
    got = tier.get("ns1:a")
    assert got is not None and got.equals(a)
    assert tier.get("ns1:missing") is None
    assert tier.contains("ns2:c") and not tier.contains("ns2:a")
    assert sorted(tier.keys("ns1")) == ["ns1:a", "ns1:b"]
    assert sorted(tier.keys("ns2")) == ["ns2:c"]
    assert sorted(tier.keys()) == ["ns1:a", "ns1:b", "ns2:c"]
    assert list(tier.keys("ns3")) == []
    tier.put("ns1:a", b)  # overwrite
    got = tier.get("ns1:a")
    assert got is not None and got.equals(b)
    assert tier.delete("ns1:a") and not tier.delete("ns1:a")
    assert tier.get("ns1:a") is None and sorted(tier.keys()) == ["ns1:b", "ns2:c"]
    stats = tier.stats.snapshot()
    counts = {name: stats[name] for name in ("hits", "misses", "puts", "deletes", "errors")}
    assert counts == {"hits": 2, "misses": 2, "puts": 4, "deletes": 1, "errors": 0}
    assert (stats["latency"]["get"]["count"], stats["latency"]["put"]["count"]) == (4, 4)


def test_keys_skip_foreign_keys_and_other_prefixes(url: str, make_redis_tier: Callable[..., RedisTier],
                                                  raw: Any) -> None:
    mine = make_redis_tier(url)
    other = make_redis_tier(url, key_prefix="other-app:")
    mine.put("ns:x", sample_chunk(1))
    other.put("ns:y", sample_chunk(2))
    raw.set("ragkv:ns:bad key!", b"junk")  # not a valid store key: never listed
    raw.set("ragkv-unrelated", b"junk")
    assert list(mine.keys("ns")) == ["ns:x"] and list(other.keys()) == ["ns:y"]
    assert mine.get("ns:y") is None and other.get("ns:y") is not None


def test_used_bytes_tracks_what_this_process_wrote(tier: RedisTier) -> None:
    assert tier.used_bytes() == 0
    tier.put("ns:a", sample_chunk(1))
    one = tier.used_bytes()
    assert one > sample_chunk(1).nbytes
    tier.put("ns:b", sample_chunk(2))
    tier.put("ns:b", sample_chunk(2))  # an overwrite is not counted twice
    assert tier.used_bytes() == 2 * one
    tier.delete("ns:a")
    assert tier.used_bytes() == one
    assert tier.describe()["used_bytes"] == one


def test_ttl_expires_entries(url: str, make_redis_tier: Callable[..., RedisTier], raw: Any) -> None:
    tier = make_redis_tier(url)
    tier.put("ns:short", sample_chunk(1), ttl_s=0.15)
    tier.put("ns:long", sample_chunk(2))
    assert 0 < raw.pttl("ragkv:ns:short") <= 150 and raw.pttl("ragkv:ns:long") == -1
    blob = tier.get_blob("ns:short")
    assert blob is not None and read_header(blob).expires_at is not None  # the header carries the expiry too
    with_default = make_redis_tier(url, key_prefix="ttl:", default_ttl_s=0.15)
    with_default.put("ns:d", sample_chunk(3))
    assert 0 < raw.pttl("ttl:ns:d") <= 150
    time.sleep(0.3)
    assert tier.get("ns:short") is None and with_default.get("ns:d") is None
    assert tier.get("ns:long") is not None


def test_pin_and_ttl_are_independent(url: str, make_redis_tier: Callable[..., RedisTier], raw: Any) -> None:
    tier = make_redis_tier(url, default_ttl_s=0.2)
    tier.put("ns:p", sample_chunk(1))
    tier.pin("ns:p")
    assert raw.pttl("ragkv:ns:p") > 0 and tier.is_pinned("ns:p")  # pinning does not make it immortal
    tier.put("ns:p", sample_chunk(2), ttl_s=0.1)
    assert 0 < raw.pttl("ragkv:ns:p") <= 100
    time.sleep(0.3)
    assert tier.get("ns:p") is None


# -- blobs ----------------------------------------------------------------------------------------------
def test_put_blob_and_get_blob_move_blobs_unchanged(tier: RedisTier, raw: Any) -> None:
    chunk = sample_chunk(4)
    blob = encode_entry(chunk, tier.codec, key="ns:b")
    tier.put_blob("ns:b", blob)
    assert tier.get_blob("ns:b") == blob and raw.get("ragkv:ns:b") == blob
    got = tier.get("ns:b")
    assert got is not None and got.equals(chunk)
    # A blob that carries an expiry keeps it as the Redis TTL; an expired one is not stored.
    tier.put_blob("ns:exp", encode_entry(chunk, tier.codec, expires_at=time.time() + 5))
    assert 3000 < raw.pttl("ragkv:ns:exp") <= 5000
    tier.put_blob("ns:gone", encode_entry(chunk, tier.codec, expires_at=time.time() - 1))
    assert not raw.exists("ragkv:ns:gone") and tier.stats.snapshot()["expired"] == 1
    # An explicit ttl_s wins and is written into the header as well.
    tier.put_blob("ns:ttl", encode_entry(chunk, tier.codec), ttl_s=60)
    stored = tier.get_blob("ns:ttl")
    assert stored is not None and read_header(stored).expires_at is not None
    assert 50_000 < raw.pttl("ragkv:ns:ttl") <= 60_000


def test_put_blob_rejects_an_invalid_blob_and_stores_nothing(tier: RedisTier, raw: Any) -> None:
    blob = encode_entry(sample_chunk(5), tier.codec)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    for bad in (b"", b"not a ragkv blob", blob[:-1], bytes(flipped), blob + b"\x00"):
        with pytest.raises(CorruptEntry):
            tier.put_blob("ns:bad", bad)
    assert not raw.exists("ragkv:ns:bad") and not tier.contains("ns:bad")
    stats = tier.stats.snapshot()
    assert stats["puts"] == 0 and stats["errors"] == 0 and tier.used_bytes() == 0


# -- batches and large values ------------------------------------------------------------------------------
def test_batched_operations(tier: RedisTier, raw: Any) -> None:
    items = [(f"ns{i % 3}:k{i}", sample_chunk(i)) for i in range(40)]
    tier.put_many(items, ttl_s=30)
    assert all(0 < raw.pttl("ragkv:" + k) <= 30_000 for k, _ in items[:5])
    keys = [k for k, _ in items]
    wanted = keys[:10] + ["ns0:absent"] + keys[10:]
    got = tier.get_many(wanted)
    assert got[10] is None
    assert all(g is not None and g.equals(c) for g, (_, c) in zip(got[:10] + got[11:], items, strict=True))
    assert tier.contains_many(["ns1:absent", keys[0], keys[39]]) == [False, True, True]
    blobs = tier.get_many_blobs(keys[:3] + ["ns1:absent"])
    assert blobs[3] is None and all(b is not None for b in blobs[:3])
    assert sorted(tier.keys("ns1")) == sorted(k for k in keys if k.startswith("ns1:"))
    assert tier.delete_many(keys[:20] + ["ns2:absent"]) == 20
    assert tier.get_many(keys[:20]) == [None] * 20 and len(list(tier.keys())) == 20
    assert tier.stats.snapshot()["puts"] == 40


def test_multi_megabyte_values_round_trip_exactly(tier: RedisTier) -> None:
    big = sample_chunk(6, tokens=400, layers=4, heads=8, dim=128)  # 6.25 MiB of float16
    assert big.nbytes > 6 * MB
    tier.put("ns:big", big)
    got = tier.get("ns:big")
    assert got is not None and got.equals(big)
    many = [(f"ns:m{i}", sample_chunk(10 + i, tokens=256, layers=4, heads=8, dim=64)) for i in range(3)]
    tier.put_many(many)
    for g, (_, c) in zip(tier.get_many([k for k, _ in many]), many, strict=True):
        assert g is not None and g.equals(c)
    assert tier.stats.snapshot()["bytes_out"] > 6 * MB + 3 * 2 * MB


def test_values_over_max_value_bytes_are_not_stored(
    url: str, make_redis_tier: Callable[..., RedisTier],
) -> None:
    tier = make_redis_tier(url, max_value_bytes=4096)
    tier.put("ns:small", sample_chunk(1))
    tier.put("ns:large", sample_chunk(2, tokens=256))  # ~16 KB
    assert tier.contains("ns:small") and not tier.contains("ns:large")
    assert tier.stats.snapshot()["evictions"] == 1


# -- the wire: hiredis parsing, pure-Python packing --------------------------------------------------------
def _live_connections(tier: RedisTier) -> list[Any]:
    client = tier._connect()
    pools = ([node.redis_connection.connection_pool for node in client.get_nodes()]
             if tier.config.address.cluster else [client.connection_pool])
    conns = []
    for pool in pools:
        conn = pool.get_connection()
        conns.append(conn)
        pool.release(conn)
    return conns


def test_connections_parse_with_hiredis_and_pack_in_python(tier: RedisTier) -> None:
    import redis.connection
    from redis._parsers import _HiredisParser

    tier.put("ns:wire", sample_chunk(7))  # connect for real
    assert tier.get("ns:wire") is not None
    conns = _live_connections(tier)
    assert len(conns) == (3 if tier.config.address.cluster else 1)
    for conn in conns:
        assert isinstance(conn._command_packer, redis.connection.PythonRespSerializer)
        assert isinstance(conn._parser, _HiredisParser)
        assert conn.socket_timeout == tier.config.socket_timeout_s
        assert conn.socket_connect_timeout == tier.config.connect_timeout_s


def test_closed_tier_answers_misses(url: str, make_redis_tier: Callable[..., RedisTier]) -> None:
    tier = make_redis_tier(url)
    tier.put("ns:a", sample_chunk(1))
    tier.close()
    assert tier.get("ns:a") is None and not tier.contains("ns:a") and list(tier.keys()) == []
    tier.put("ns:b", sample_chunk(2))  # dropped, no exception
    tier.close()  # idempotent
