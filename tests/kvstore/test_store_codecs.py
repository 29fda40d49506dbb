"""Slow tiers store with the codec their config names; the container header records it; reads decode it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kv_samples import key_of, make_chunk

from ragkv.kvstore import TieredStore, read_header

CODEC_SPECS = [
    ("raw", "codec=raw", True),
    ("zstd", "codec=zstd&codec.level=3&codec.shuffle=true", True),
    ("quant-int8", "codec=quant&codec.bits=8", False),
    ("quant-int4", "codec=quant&codec.bits=4", False),
    ("cachegen-1", "codec=cachegen&codec.level=1", False),
    ("cachegen-2", "codec=cachegen&codec.level=2", False),
    ("cachegen-3", "codec=cachegen&codec.level=3", False),
]


@pytest.mark.parametrize("name, options, lossless", CODEC_SPECS, ids=[c[0] for c in CODEC_SPECS])
@pytest.mark.parametrize("slow", ["disk", "redis"])
def test_slow_tier_encodes_with_its_codec(name: str, options: str, lossless: bool, slow: str, tmp_path: Path,
                                          request: pytest.FixtureRequest) -> None:
    slow_spec = f"disk:{tmp_path}?{options}" if slow == "disk" else f"{request.getfixturevalue('redis_url')}?{options}"
    chunk = make_chunk(7, tokens=96, layers=3, heads=2, dim=32)
    key = key_of(chunk)
    with TieredStore(f"host,{slow_spec}") as store:
        store.put(key, chunk)
        blob = store.tiers[1].get_blob(key)
        assert blob is not None
        header = read_header(blob)
        assert header.codec == name.split("-")[0]
        assert header.params == store.tiers[1].codec.params.to_dict()
        store.tiers[0].delete(key)  # force the read through the slow tier
        got = store.get(key)
    assert got is not None and got.meta == chunk.meta and got.kv.dtype == chunk.kv.dtype
    if lossless:
        assert torch.equal(got.kv, chunk.kv)
    else:
        err = (got.kv.float() - chunk.kv.float()).abs()
        # per-token scales: error is bounded by the value range of the data, and clearly not zero-information
        assert err.max() < chunk.kv.float().abs().max() * 0.35
        assert err.mean() < chunk.kv.float().abs().mean() * 0.3
        if name.startswith("cachegen"):
            assert len(blob) < chunk.nbytes / 2  # it compresses
