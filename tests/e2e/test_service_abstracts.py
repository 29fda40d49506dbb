"""Chunk abstracts through the real service: a left-out document in the REST answer and in /v1/stats, the
abstract kept in the tenant's own namespace, and deleted with its chunk."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

KEYS = {"alice": "sk-alice-abstracts-0123", "bob": "sk-bob-abstracts-0123"}
TEXTS = [" ".join(f"k{(i * 5 + j) % 64} v{(i * 11 + 3 * j) % 64} ;" for j in range(12)) for i in range(4)]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    from ragkv.integrations.models import build_random_model
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.integrations.service import ServiceThread
    from ragkv.integrations.service_app import ServiceState, create_app
    from ragkv.integrations.tenants import TenantRegistry
    from ragkv.kvstore import TieredStore
    from ragkv.middleware.abstract_selection import AbstractsConfig

    disk = tmp_path_factory.mktemp("abstracts-disk")
    loaded = build_random_model(layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128, max_positions=1024, seed=2)
    runtime = RagRuntime(loaded, TieredStore(f"host:64MB,disk:{disk}:256MB"), own_store=True, use_calibration=False,
                         abstracts=AbstractsConfig(enabled=True, layers=2, threshold=0.0, min_chunks=3, min_kept=1),
                         near_duplicates=True)
    registry = TenantRegistry.from_mapping({"tenants": [{"name": n, "keys": [k]} for n, k in KEYS.items()]})
    server = ServiceThread(create_app(ServiceState(runtime=runtime, registry=registry))).start()
    try:
        yield server.url, runtime
    finally:
        server.stop()
        runtime.close()


def _client(url: str, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=60)


def test_a_left_out_document_is_reported_counted_isolated_and_deleted_with_its_chunk(url: tuple[str, Any]) -> None:
    base, runtime = url
    with _client(base, "alice") as alice, _client(base, "bob") as bob:
        keys = alice.post("/v1/warm", json={"texts": TEXTS}).json()["keys"]
        out = alice.post("/v1/generate", json={"query": "Q k5 ?", "documents": TEXTS, "max_new_tokens": 2,
                                               "strategy": "reuse"}).json()
        skipped = [d for d in out["documents"] if d["source"] == "skipped"]
        assert len(out["documents"]) == 4 and len(skipped) == 3
        assert all(d["abstract_gap"] < 0 and d["hit"] is False for d in skipped)
        stats = alice.get("/v1/stats").json()["abstracts"]
        assert stats["enabled"] and stats["chunks_skipped"] >= 3 and stats["threshold"] == 0.0
        abstract = f"{keys[0]}.abstract"
        assert abstract.startswith("alice:") and alice.head(f"/v1/chunks/{abstract}").status_code == 200
        assert bob.get(f"/v1/chunks/{abstract}").status_code in (403, 404)  # another tenant's: never readable
        assert alice.delete(f"/v1/chunks/{keys[0]}").status_code == 204
        assert alice.head(f"/v1/chunks/{abstract}").status_code == 404 and not runtime.store.contains(abstract)


def test_an_uploaded_blob_gets_its_abstract_and_is_a_near_duplicate_source_at_once(url: tuple[str, Any]) -> None:
    base, runtime = url
    with _client(base, "alice") as alice:
        (key,) = alice.post("/v1/warm", json={"texts": [TEXTS[1] + " k1 v1 k2 v2"]}).json()["keys"]
        blob = alice.get(f"/v1/chunks/{key}").content
        assert alice.delete(f"/v1/chunks/{key}").status_code == 204
        runtime.engine.near_duplicates.index.remove(key)
        indexed = len(runtime.engine.near_duplicates.index)
        assert alice.put(f"/v1/chunks/{key}", content=blob,
                         headers={"Content-Type": "application/octet-stream"}).status_code == 201
        assert alice.head(f"/v1/chunks/{key}.abstract").status_code == 200
        assert len(runtime.engine.near_duplicates.index) == indexed + 1
