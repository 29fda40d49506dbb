"""Codec calibration: the transform basis fitted on the model's own chunk KV, kept in the store, named in a
strict file, and used by chunks stored on a transform-coded tier (loaded layer by layer for blend)."""
from __future__ import annotations

import json

import pytest
import torch

from ragkv.codecs.transform_basis import find_basis, forget_basis
from ragkv.kvstore.errors import ConfigError
from ragkv.kvstore.store import TieredStore
from ragkv.kvstore.tiers import DiskConfig, DiskTier, HostConfig, HostTier
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.codec_calibration import (
    CodecCalibration,
    calibrate_transform,
    codec_calibration_path,
    load_codec_calibration,
    use_codec_calibration,
)
from ragkv.middleware.engine import ContextEngine


@pytest.fixture(scope="module")
def adapter(word_tokenizer, model_factory):
    return ModelAdapter(model_factory("llama", seed=3, layers=3), word_tokenizer)


def test_the_basis_is_fitted_kept_in_the_store_and_used_by_a_transform_tier(adapter, make_words, rag_request,
                                                                            tmp_path):
    disk = DiskTier(DiskConfig(path=str(tmp_path / "kv"), fsync=False, codec="transform", codec_params={"level": 6}))
    store = TieredStore([HostTier(HostConfig()), disk])
    engine = ContextEngine(adapter, store)
    record, basis = calibrate_transform(engine, [make_words(200 + 7 * i, 40) for i in range(12)])
    try:
        assert record.transform_basis == basis.digest and record.chunks == 12 and record.tokens >= 12 * 40
        assert disk.get_artefact(basis.digest) is not None and store.tiers[0].get_artefact(basis.digest) is not None
        assert len(basis.inv_freq) == adapter.head_dim // 2  # keys fitted with RoPE undone
        reference = ContextEngine(adapter, HostTier(HostConfig()))
        reference.warm(rag_request.chunks)
        exact = reference.prepare(rag_request, "blend")
        keys = engine.warm(rag_request.chunks).keys
        for key in keys:
            store.tiers[0].delete(key)  # only the transform-coded disk copies are left
            assert json.loads(_header(disk, key))["params"]["basis"] == basis.digest
        prepared = engine.prepare(rag_request, "blend")
        assert [(c.tier, c.codec) for c in prepared.chunks] == [("disk", "transform")] * len(keys)
        drift = (prepared.logits - exact.logits).abs().max() / exact.logits.abs().max()
        assert drift < 0.05  # lossy, near: a small model at the widest level
    finally:
        store.close()
        forget_basis(basis.digest)


def _header(disk: DiskTier, key: str) -> str:
    from ragkv.kvstore.container import read_header

    blob = disk.get_blob(key)
    header = read_header(blob)
    return json.dumps({"params": header.params})


def test_the_record_is_saved_and_read_back_strictly(tmp_path):
    record = CodecCalibration("abc123", "a" * 64, 1, 8, 400)
    path = record.save(tmp_path)
    assert path == codec_calibration_path(tmp_path, "abc123")
    assert load_codec_calibration(tmp_path, "abc123") == record
    assert load_codec_calibration(tmp_path, "other1") is None
    for bad in ({"transform_basis": "A" * 64}, {"layer_group": 0}, {"chunks": True}, {"version": 2},
                {"tokens": float("nan")}, {"fingerprint": "other1"}):
        path.write_text(json.dumps({**record.to_dict(), **bad}))
        assert load_codec_calibration(tmp_path, "abc123") is None
    path.write_text("{not json")
    assert load_codec_calibration(tmp_path, "abc123") is None
    with pytest.raises(ConfigError):
        codec_calibration_path(tmp_path, "../x")


def test_a_basis_no_open_store_holds_is_not_used(adapter, make_words):
    engine = ContextEngine(adapter, HostTier(HostConfig()))
    record, basis = calibrate_transform(engine, [make_words(5, 30), make_words(50, 30)], layer_group=3)
    assert len(basis.groups) == 1
    assert use_codec_calibration(record) is basis
    forget_basis(basis.digest)
    assert use_codec_calibration(record) is not None  # the host tier still holds its bytes
    engine.store.close()
    del engine
    forget_basis(basis.digest)
    import gc

    gc.collect()  # the closed tier's source goes with it
    with pytest.raises(Exception, match="not available"):
        find_basis(basis.digest)
    assert use_codec_calibration(record) is None
    assert use_codec_calibration(None) is None
    with pytest.raises(ConfigError):
        calibrate_transform(ContextEngine(adapter, HostTier(HostConfig())), ["", ""])
    assert torch.get_default_dtype() == torch.float32
