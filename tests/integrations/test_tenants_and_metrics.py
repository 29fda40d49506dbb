"""Tenants (keys file parsing, namespace rules) and service metrics (Prometheus text, bounded labels)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ragkv.integrations.metrics import Metrics, cache_state
from ragkv.integrations.tenants import Tenant, TenantRegistry
from ragkv.kvstore import ConfigError


def test_keys_file_json_and_toml(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"sk-bob").hexdigest()
    (tmp_path / "keys.json").write_text(json.dumps({"tenants": [
        {"name": "alice", "keys": ["sk-alice", "sk-alice-2"]},
        {"name": "bob", "key_sha256": [digest], "namespace": "bob-prod", "publish": False, "admin": True}]}))
    registry = TenantRegistry.from_file(tmp_path / "keys.json")
    assert registry.authenticate("sk-alice") == registry.authenticate("sk-alice-2") == Tenant("alice", "alice")
    bob = registry.authenticate("sk-bob")
    assert bob is not None and bob.namespace == "bob-prod" and not bob.publish and bob.admin
    assert registry.authenticate("sk-nobody") is None and registry.authenticate(None) is None
    assert registry.authenticate("x" * 10_000) is None
    (tmp_path / "keys.toml").write_text('[[tenants]]\nname = "carol"\nkeys = ["sk-carol"]\n')
    assert TenantRegistry.from_file(tmp_path / "keys.toml").authenticate("sk-carol") == Tenant("carol", "carol")


@pytest.mark.parametrize("data, match", [
    ({"tenants": []}, "tenants"),
    ({"tenants": [{"name": "a"}]}, "no keys"),
    ({"tenants": [{"name": "shared", "keys": ["k"]}]}, "shared namespace"),
    ({"tenants": [{"name": "a", "keys": ["k1"]}, {"name": "b", "namespace": "a", "keys": ["k2"]}]}, "share"),
    ({"tenants": [{"name": "a", "keys": ["k"]}, {"name": "b", "keys": ["k"]}]}, "two tenants"),
    ({"tenants": [{"name": "a b", "keys": ["k"]}]}, "namespace"),
    ({"tenants": [{"name": "a", "keys": ["k"], "role": "x"}]}, "unknown tenant fields"),
    ({"tenants": [{"name": "a", "key_sha256": ["zz"]}]}, "hex"),
])
def test_bad_keys_files_are_refused(data: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TenantRegistry.from_mapping(data)


def test_namespace_rules() -> None:
    alice = Tenant("alice", "alice", publish=True, admin=False)
    assert alice.can_read("alice:x") and alice.can_read("shared:x") and not alice.can_read("bob:x")
    # publishing lets the server compute shared chunks from text; binary blobs go into shared only as admin
    assert alice.can_write("alice:x") and not alice.can_write("shared:x") and not alice.can_write("bob:x")
    assert Tenant("ops", "ops", admin=True).can_write("shared:x")
    assert alice.lookup_order() == ("alice", "shared")
    assert alice.can_delete("alice:x") and not alice.can_delete("shared:x") and not alice.can_delete("bob:x")
    reader = Tenant("r", "r")  # roles are opt-in
    assert not reader.can_write("shared:x")
    with pytest.raises(PermissionError):
        reader.write_namespace(shared=True)
    assert alice.write_namespace(shared=True) == "shared" and alice.write_namespace(shared=False) == "alice"


def test_open_registry_is_one_tenant() -> None:
    registry = TenantRegistry.open_access()
    assert registry.open and registry.authenticate(None) == registry.authenticate("anything")


def test_prometheus_text_is_well_formed_and_bounded() -> None:
    metrics = Metrics()
    for i in range(500):
        metrics.observe_request("GET", "unmatched", 404, 0.001)
        metrics.observe_request("BREW", "/v1/chunks/{key}", 200, 0.002 * (i % 7))
    metrics.observe_answer(0.05, "blend", [True, True], ["host", "disk"])
    metrics.observe_answer(0.5, "blend", [False], [None])
    metrics.observe_warm(3, 1)
    metrics.add_chunk_bytes("sent", 1000)
    assert len(metrics.requests) == 2 and len(metrics.durations) == 2  # labels do not grow with traffic
    text = metrics.render_prometheus({"hits": 3, "misses": 1, "tiers": {"host": {"used_bytes": 10,
                                      "capacity_bytes": 100, "hits": 2, "misses": 1}}}, {"ragkv_x": 1})
    assert 'ragkv_http_requests_total{method="OTHER",route="/v1/chunks/{key}",status="200"} 500' in text
    assert 'ragkv_ttft_seconds_bucket{cache="warm",le="+Inf"} 1' in text
    assert 'ragkv_documents_total{outcome="hit",tier="disk"} 1' in text
    assert 'ragkv_tier_capacity_bytes{tier="host"} 100' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    snapshot = metrics.snapshot()
    assert snapshot["document_hit_rate"] == pytest.approx(2 / 3) and snapshot["answers"] == 2
    for _ in range(1000):
        metrics.observe_answer(0.01, "reuse", [True], ["host"])
    assert len(metrics.recent_ttfts()) == 120


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.observe_request("GET", 'a"b\\c\nd', 200, 0.0)
    assert 'route="a\\"b\\\\c\\nd"' in metrics.render_prometheus({})


def test_cache_state() -> None:
    assert cache_state([]) == "none" and cache_state([True]) == "warm"
    assert cache_state([False]) == "cold" and cache_state([True, False]) == "mixed"
