"""Artefacts (a transform basis) through every tier, and transform-coded chunks whose basis comes from the
store: written once, found by digest in a fresh process, a corrupt copy skipped, a missing one a miss."""
from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import torch
from codec_kv import fit_test_basis, make_codec_kv
from redis_servers import free_port, raw_redis_client

from ragkv.codecs import get_codec
from ragkv.codecs.transform_basis import forget_basis, register_basis
from ragkv.kvstore import (
    ChunkKV,
    ChunkMeta,
    DeviceConfig,
    DiskConfig,
    HostConfig,
    RedisConfig,
    StoreConfig,
    TieredStore,
    TierUnavailable,
    chunk_key,
)
from ragkv.kvstore.artefacts import ARTEFACT_DIR, ARTEFACT_KEY
from ragkv.kvstore.tiers import make_tier

TRANSFORM = {"codec": "transform", "codec_params": {"level": 3}}


def _config(request: pytest.FixtureRequest, kind: str, **codec: Any) -> Any:
    if kind == "host":
        return HostConfig(**codec)
    if kind == "device":
        return DeviceConfig(device="cpu", **codec)
    if kind == "disk":
        return DiskConfig(path=str(request.getfixturevalue("tmp_path") / "disk"), **codec)
    if kind == "redis":
        return RedisConfig(url=request.getfixturevalue("redis_url"), **codec)
    if kind == "cluster":
        return RedisConfig(url=request.getfixturevalue("redis_cluster").url, **codec)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["host", "device", "disk", "redis", "cluster"])
def test_an_artefact_round_trips_in_every_tier_outside_every_namespace(request, kind: str) -> None:
    data = os.urandom(3000)
    digest = hashlib.sha256(data).hexdigest()
    tier = make_tier(_config(request, kind))
    try:
        assert tier.get_artefact(digest) is None
        assert tier.put_artefact(data) == digest
        assert tier.get_artefact(digest) == data
        assert tier.get_artefact("0" * 64) is None
        assert list(tier.keys()) == [] and tier.used_bytes() == 0  # no tenant sees or pays for it
    finally:
        tier.close()


def test_the_store_writes_every_tier_reads_the_fastest_good_copy_and_copies_it_up(request, tmp_path) -> None:
    data = os.urandom(5000)
    configs = [_config(request, "host"), _config(request, "disk"), _config(request, "redis")]
    with TieredStore(StoreConfig(tiers=tuple(configs))) as store:
        digest = store.put_artefact(data)
        assert all(tier.get_artefact(digest) == data for tier in store.tiers)
    (tmp_path / "disk" / ARTEFACT_DIR / digest).write_bytes(b"not it")  # a corrupt disk copy
    with TieredStore(StoreConfig(tiers=tuple(configs))) as fresh:
        assert fresh.tiers[0].get_artefact(digest) is None
        assert fresh.get_artefact(digest) == data  # from redis, the disk copy skipped
        assert fresh.tiers[0].get_artefact(digest) == data and fresh.tiers[1].get_artefact(digest) == data
        raw_redis_client(request.getfixturevalue("redis_url")).delete(ARTEFACT_KEY + digest)
        assert fresh.get_artefact(digest) == data  # the host copy now
        assert fresh.get_artefact("f" * 64) is None


def test_limits_and_a_down_redis(request, tmp_path, monkeypatch) -> None:
    from ragkv.kvstore.tiers import disk as disk_module

    data = os.urandom(100)
    disk = make_tier(_config(request, "disk"))
    digest = hashlib.sha256(data).hexdigest()
    disk.put_artefact(data)
    monkeypatch.setattr(disk_module, "MAX_ARTEFACT_BYTES", 99)
    assert disk.get_artefact(digest) is None  # over the limit: not read
    down = TieredStore(StoreConfig(tiers=(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0"),)))
    try:
        assert down.get_artefact(digest) is None
        with pytest.raises(TierUnavailable):
            down.put_artefact(data)
    finally:
        down.close()
        disk.close()


def _chunk(seed: int) -> ChunkKV:
    kv = make_codec_kv(layers=3, heads=1, tokens=30, dim=6, seed=seed)
    return ChunkKV(kv, ChunkMeta(fingerprint="test-model", token_ids=tuple(range(seed, seed + 30)), position=1))


@pytest.mark.parametrize("kind", ["disk", "redis", "cluster"])
def test_transform_chunks_decode_in_a_fresh_process_with_the_basis_from_the_store(request, kind: str) -> None:
    basis, data = fit_test_basis(3, 1, 6, layer_group=3)
    chunk = _chunk(7)
    key = chunk_key("test-model", "t1", chunk.meta.token_ids)
    config = StoreConfig(tiers=(_config(request, kind, **TRANSFORM),))
    try:
        with TieredStore(config) as store:
            assert store.put_artefact(data) == basis.digest
            register_basis(basis, default=True)
            store.put(key, chunk)
            codec = get_codec("transform", {"level": 3})
            expected = codec.decode(codec.encode(chunk.kv, position=1), tuple(chunk.kv.shape), chunk.kv.dtype)
        forget_basis(basis.digest)  # as a new process knows no basis
        with TieredStore(config) as fresh:
            got = fresh.get(key)
            assert got is not None and torch.equal(got.kv, expected)
    finally:
        forget_basis(basis.digest)


def test_a_chunk_whose_basis_is_gone_is_a_miss(request, tmp_path) -> None:
    basis, data = fit_test_basis(3, 1, 6, layer_group=3)
    chunk = _chunk(8)
    key = chunk_key("test-model", "t1", chunk.meta.token_ids)
    config = StoreConfig(tiers=(_config(request, "disk", **TRANSFORM),))
    try:
        with TieredStore(config) as store:
            store.put_artefact(data)
            register_basis(basis, default=True)
            store.put(key, chunk)
        forget_basis(basis.digest)
        (tmp_path / "disk" / ARTEFACT_DIR / basis.digest).unlink()
        with TieredStore(config) as fresh:
            assert fresh.get(key) is None
    finally:
        forget_basis(basis.digest)
