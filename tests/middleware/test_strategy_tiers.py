"""Strategies with chunks on several tiers: host, disk (pipelined layer-wise decode), and a TieredStore."""
from __future__ import annotations

import pytest
import torch

from ragkv.codecs import available_codecs
from ragkv.kvstore.store import TieredStore
from ragkv.kvstore.tiers import DiskConfig, DiskTier, HostConfig, HostTier
from ragkv.kvstore.tiers.base import Tier
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.engine import ContextEngine, EngineConfig

pytestmark = pytest.mark.skipif(DiskTier.get is Tier.get, reason="the disk tier has not landed yet")

ATOL = 1e-4


@pytest.fixture(scope="module")
def adapter(word_tokenizer, model_factory):
    return ModelAdapter(model_factory("qwen3", seed=2, layers=4), word_tokenizer)


def _engine(adapter, store, **config):
    return ContextEngine(adapter, store, EngineConfig(**config))


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("strategy", ["reuse", "blend", "auto", "compress"])
def test_chunks_from_disk_match_host(strategy, pipelined, adapter, rag_request, tmp_path):
    from ragkv.middleware.controller import AutoConfig

    def pick(engine):  # auto's plan follows measured speeds: pin it here so both runs plan the same
        if strategy == "auto":
            return engine.strategy("auto", AutoConfig(allow_recompute=False, min_ratio=0.15, max_ratio=0.15))
        return strategy

    host = _engine(adapter, HostTier(HostConfig()))
    host.warm(rag_request.chunks)
    reference = host.prepare(rag_request, pick(host))

    store = TieredStore([HostTier(HostConfig()), DiskTier(DiskConfig(path=str(tmp_path / "kv"), fsync=False))])
    engine = _engine(adapter, store, pipelined_loading=pipelined)
    keys = engine.warm(rag_request.chunks).keys
    store.tiers[0].delete(keys[0])  # chunk 0 only on disk, chunk 1 on both, chunk 2 only on disk
    store.tiers[0].delete(keys[2])
    prepared = engine.prepare(rag_request, pick(engine))
    assert [(c.hit, c.tier) for c in prepared.chunks] == [(True, "disk"), (True, "host"), (True, "disk")]
    assert prepared.chunks[0].codec == "raw" and prepared.chunks[1].codec == "decoded"
    assert (prepared.logits - reference.logits).abs().max() <= ATOL
    # after a load from disk the chunk was promoted into the host tier: the next request reads it there
    again = engine.prepare(rag_request, pick(engine))
    assert [c.tier for c in again.chunks] == ["host"] * 3
    store.close()


def test_plain_disk_tier_as_the_store(adapter, rag_request, tmp_path):
    disk = DiskTier(DiskConfig(path=str(tmp_path / "d"), fsync=False))
    engine = _engine(adapter, disk)
    first = engine.prepare(rag_request, "blend")
    assert all(c.source == "computed" and c.stored for c in first.chunks)
    second = engine.prepare(rag_request, "blend")
    assert all(c.hit and c.tier == "disk" for c in second.chunks)
    assert (second.logits - first.logits).abs().max() <= ATOL


@pytest.mark.skipif("zstd" not in available_codecs(), reason="zstd codec not available")
def test_disk_with_zstd_codec(adapter, rag_request, tmp_path):
    host = _engine(adapter, HostTier(HostConfig()))
    host.warm(rag_request.chunks)
    reference = host.prepare(rag_request, "blend")
    disk = DiskTier(DiskConfig(path=str(tmp_path / "z"), fsync=False, codec="zstd"))
    engine = _engine(adapter, disk)
    engine.warm(rag_request.chunks)
    prepared = engine.prepare(rag_request, "blend")
    assert {c.codec for c in prepared.chunks} == {"zstd"}
    assert torch.allclose(prepared.logits, reference.logits, atol=ATOL)


def test_chunk_that_fails_to_decode_midway_is_recomputed(adapter, rag_request, tmp_path):
    from ragkv.codecs import CodecError, register_codec
    from ragkv.codecs.raw import RawCodec

    @register_codec
    class FailingAtLayer2(RawCodec):
        name = "test-fails-at-layer-2"

        def decode_layer(self, data, shape, dtype, layer_index, num_layers, out):
            if layer_index == 2:
                raise CodecError("garbled layer")
            super().decode_layer(data, shape, dtype, layer_index, num_layers, out)

    host = _engine(adapter, HostTier(HostConfig()))
    host.warm(rag_request.chunks)
    reference = host.prepare(rag_request, "blend")
    engine = _engine(adapter, DiskTier(DiskConfig(path=str(tmp_path / "f"), fsync=False, codec=FailingAtLayer2.name)))
    engine.warm(rag_request.chunks)
    prepared = engine.prepare(rag_request, "blend")  # pipelined: layers 0-1 arrive, layer 2 fails
    assert all(not c.hit and c.source == "computed" for c in prepared.chunks)
    assert (prepared.logits - reference.logits).abs().max() <= ATOL


@pytest.mark.parametrize("pipelined", [True, False])
def test_mismatched_entry_on_disk_is_replaced(pipelined, adapter, rag_request, tmp_path):
    from ragkv.kvstore.chunk import ChunkKV, ChunkMeta

    disk = DiskTier(DiskConfig(path=str(tmp_path / "m"), fsync=False))
    engine = _engine(adapter, disk, pipelined_loading=pipelined)
    reference = engine.prepare(rag_request, "blend")  # misses: computed and stored
    seg = engine.assemble(rag_request).chunks[1]
    good = disk.get(seg.key)
    disk.put(seg.key, ChunkKV(good.kv, ChunkMeta("another-model", good.meta.token_ids, 1, good.meta.dtype, True)))
    prepared = engine.prepare(rag_request, "blend")
    assert [c.hit for c in prepared.chunks] == [True, False, True]
    assert prepared.chunks[1].source == "computed" and prepared.chunks[1].stored
    assert (prepared.logits - reference.logits).abs().max() <= ATOL
    assert disk.get(seg.key).meta.fingerprint == str(adapter.fingerprint)  # written back
    assert all(c.hit for c in engine.prepare(rag_request, "blend").chunks)
