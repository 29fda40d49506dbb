"""Spec strings, config files and the embedded default."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragkv.kvstore import (
    ConfigError,
    DeviceConfig,
    DiskConfig,
    HostConfig,
    RedisConfig,
    StoreConfig,
    parse_spec,
)
from ragkv.kvstore.config import default_config, load_config, resolve_config
from ragkv.kvstore.tiers.base import parse_size


def test_sizes() -> None:
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5kb") == 1500
    assert parse_size(1024) == 1024
    assert parse_size(None) is None
    for bad in ("4XB", "GB", "-1GB", "lots"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_spec_with_every_tier_kind(tmp_path: Path) -> None:
    cfg = parse_spec(f"device:cpu:1GB,host:4GB,disk:{tmp_path}/kv:50GB?fsync=false,redis://127.0.0.1:6390/2?ttl=60")
    device, host, disk, redis = cfg.tiers
    assert isinstance(device, DeviceConfig) and device.device == "cpu" and device.capacity_bytes == 10**9
    assert isinstance(host, HostConfig) and host.capacity_bytes == 4 * 10**9
    assert isinstance(disk, DiskConfig) and disk.path == f"{tmp_path}/kv" and disk.capacity_bytes == 50 * 10**9
    assert disk.fsync is False
    assert isinstance(redis, RedisConfig) and redis.url == "redis://127.0.0.1:6390/2" and redis.default_ttl_s == 60


def test_cluster_spec_gathers_seed_nodes() -> None:
    cfg = parse_spec("host:1GB,redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002?prefix=rk:")
    host, cluster = cfg.tiers
    assert isinstance(cluster, RedisConfig)
    assert cluster.url == "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
    assert cluster.key_prefix == "rk:"


def test_codec_options_in_spec(tmp_path: Path) -> None:
    (disk,) = parse_spec(f"disk:{tmp_path}?codec=raw&eviction=fifo").tiers
    assert disk.codec == "raw" and disk.eviction == "fifo" and disk.capacity_bytes is None


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("ssd:/x", "unknown tier"),
    ("host:4XB", "invalid size"),
    ("disk:", "needs a path"),
    ("host:1GB?colour=blue", "unknown option"),
    ("host?codec=nope", "unknown codec"),
    ("host?eviction=random", "eviction"),
])
def test_bad_specs_name_what_is_allowed(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


def test_store_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="write_policy"):
        parse_spec("host", write_policy="sometimes")
    with pytest.raises(ConfigError):
        StoreConfig(tiers=())


def test_config_files(tmp_path: Path) -> None:
    data = {"write_policy": "write-back", "tiers": [{"kind": "host", "capacity": "1GB"},
                                                    {"kind": "disk", "path": str(tmp_path / "d"), "capacity": "2GB"}]}
    (tmp_path / "store.json").write_text(json.dumps(data))
    (tmp_path / "store.toml").write_text(
        'write_policy = "write-back"\n[[tiers]]\nkind = "host"\ncapacity = "1GB"\n'
        f'[[tiers]]\nkind = "disk"\npath = "{tmp_path / "d"}"\ncapacity = "2GB"\n')
    a = load_config(tmp_path / "store.json")
    b = resolve_config(str(tmp_path / "store.toml"))
    assert a == b
    assert a.write_policy == "write-back" and a.tiers[1].capacity_bytes == 2 * 10**9
    (tmp_path / "bad.json").write_text('{"tiers": [{"kind": "host", "size": 3}]}')
    with pytest.raises(ConfigError, match="unknown options"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(tmp_path / "broken.json")


def test_default_is_host_plus_disk_under_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAGKV_STORE", raising=False)
    cfg = resolve_config(None)
    assert cfg == default_config()
    assert [type(t) for t in cfg.tiers] == [HostConfig, DiskConfig]
    assert cfg.tiers[1].path == str(tmp_path / "cache")
    monkeypatch.setenv("RAGKV_STORE", "host:1MB")
    assert resolve_config(None).tiers == (HostConfig(capacity_bytes=10**6),)
