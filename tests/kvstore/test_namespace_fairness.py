"""One tenant writing its own chunks once pushed every other tenant's chunks out of a shared tier.
Eviction is now fair between namespaces: the namespace holding the most bytes loses first."""
from __future__ import annotations

from pathlib import Path

import pytest
from kv_samples import make_chunk

from ragkv.kvstore import DiskConfig, HostConfig
from ragkv.kvstore.tiers import make_tier


def key(ns: str, i: int) -> str:
    return f"{ns}:{i:040x}"


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_a_tenant_filling_the_tier_cannot_push_another_below_its_share(tmp_path: Path, kind: str) -> None:
    chunk = make_chunk(1)
    probe = make_tier(DiskConfig(path=str(tmp_path / "probe"), fsync=False)) if kind == "disk" else None
    size = chunk.nbytes
    if probe is not None:
        probe.put(key("victim", 0), chunk)  # the same key length as every key below
        size = probe.used_bytes()
    config = (HostConfig(capacity_bytes=10 * size) if kind == "host"
              else DiskConfig(path=str(tmp_path / "tier"), capacity_bytes=10 * size, fsync=False))
    tier = make_tier(config)
    for i in range(10):
        tier.put(key("victim", i), make_chunk(i))
    for i in range(40):
        tier.put(key("noisy_", i), make_chunk(100 + i))
    victim = sum(tier.contains(key("victim", i)) for i in range(10))
    noisy = sum(tier.contains(key("noisy_", i)) for i in range(40))
    assert victim == 5 and noisy == 5  # an even split, and the noisy tenant kept its newest entries
    assert all(tier.contains(key("noisy_", i)) for i in range(35, 40))
    assert tier.namespace_usage("victim") == (5 * size, 0)
    tier.pin(key("victim", 9))
    assert tier.namespace_usage("victim") == (5 * size, size)
    tier.close()
