"""A real ragkv service for the end-to-end tests: the FastAPI app served by uvicorn on a free loopback port.

One server per session (a tiny random Llama, host memory in front of a disk directory, five tenants with
different roles and quotas, small limits so the limit tests stay cheap). Tests call it over HTTP with httpx, as any client would.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

torch.set_num_threads(2)

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789", "admin": "sk-admin-0123456789",
        "reader": "sk-reader-0123456789", "small": "sk-small-0123456789"}
LIMITS = {"max_chunk_bytes": 4 << 20, "max_json_bytes": 256 << 10, "max_documents": 16, "max_new_tokens": 32,
          "max_text_chars": 20_000, "max_warm_texts": 64, "max_lookup_keys": 64, "max_waiting": 8, "body_timeout_s": 2}
SMALL_QUOTA = 40_000  # bytes the "small" tenant may hold; it may pin up to half of that


@dataclass
class Service:
    url: str
    state: Any
    keys: dict[str, str]
    limits: dict[str, int]

    def client(self, tenant: str | None = "alice", **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from ragkv.integrations.models import build_random_model
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.integrations.service import ServiceThread
    from ragkv.integrations.service_app import ServiceState, create_app
    from ragkv.integrations.service_http import ServiceLimits
    from ragkv.integrations.tenants import TenantRegistry
    from ragkv.kvstore import TieredStore

    disk = tmp_path_factory.mktemp("service-disk")
    loaded = build_random_model(layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128, max_positions=1024, seed=2)
    runtime = RagRuntime(loaded, TieredStore(f"host:64MB,disk:{disk}:512MB"), own_store=True, max_waiting=8)
    registry = TenantRegistry.from_mapping({"tenants": [
        {"name": "alice", "keys": [KEYS["alice"]], "publish": True},
        {"name": "bob", "keys": [KEYS["bob"]]},
        {"name": "admin", "keys": [KEYS["admin"]], "namespace": "ops", "admin": True, "pin": True},
        {"name": "reader", "keys": [KEYS["reader"]]},
        {"name": "small", "keys": [KEYS["small"]], "pin": True, "quota_bytes": SMALL_QUOTA,
         "pinned_quota_bytes": SMALL_QUOTA // 2},
    ]})
    state = ServiceState(runtime=runtime, registry=registry, limits=ServiceLimits(**LIMITS))
    server = ServiceThread(create_app(state)).start()
    try:
        yield Service(server.url, state, dict(KEYS), dict(LIMITS))
    finally:
        server.stop()
        runtime.close()


@pytest.fixture()
def alice(service: Service) -> Iterator[httpx.Client]:
    with service.client("alice") as c:
        yield c


@pytest.fixture()
def bob(service: Service) -> Iterator[httpx.Client]:
    with service.client("bob") as c:
        yield c
