"""The hand-off endpoints of a server of role "both": prefill then decode equals generate, a handle is the
publishing tenant's only and used once, the hand-off counts against the tenant's quota."""
from __future__ import annotations

from typing import Any

import httpx
from unique_text import unique_words


def _documents() -> list[str]:
    fresh = unique_words()
    return [f"k{i} v{2 * i} ; the k{i + 9} v{i + 3} ; see {fresh}" for i in range(3)]


def test_prefill_then_decode_answers_as_generate(alice: httpx.Client) -> None:
    body = {"query": "Q k2 ?", "documents": _documents(), "strategy": "reuse"}
    generated = alice.post("/v1/generate", json={**body, "max_new_tokens": 6}).json()
    published = alice.post("/v1/prefill", json={**body, "ttl_s": 60})
    assert published.status_code == 200, published.text
    handoff = published.json()
    assert handoff["handle"].startswith("alice:handoff-") and handoff["prompt_tokens"] > 0
    assert [d["hit"] for d in handoff["documents"]] == [True] * 3 and "prepare" in handoff["timings_ms"]
    decoded = alice.post("/v1/decode", json={"handle": handoff["handle"], "max_new_tokens": 6}).json()
    assert decoded["answer"] == generated["answer"] and decoded["documents"] == []
    assert decoded["usage"]["completion_tokens"] == generated["usage"]["completion_tokens"]
    assert alice.post("/v1/decode", json={"handle": handoff["handle"]}).status_code == 404


def test_a_handle_is_its_tenants_only(alice: httpx.Client, bob: httpx.Client) -> None:
    handle = alice.post("/v1/prefill", json={"query": "Q k3 ?", "documents": _documents()}).json()["handle"]
    assert bob.post("/v1/decode", json={"handle": handle}).status_code == 403
    assert bob.get(f"/v1/chunks/{handle}").status_code in (403, 404)
    assert alice.post("/v1/decode", json={"handle": handle, "max_new_tokens": 1}).status_code == 200
    assert alice.post("/v1/decode", json={"handle": "alice:not-a-handoff"}).status_code == 422


def test_a_handoff_must_fit_the_tenants_quota(service: Any) -> None:
    long_documents = [" ".join(f"k{j % 64} v{(i + j) % 64}" for j in range(40)) for i in range(3)]  # > 40 KB of KV
    with service.client("small") as small:
        response = small.post("/v1/prefill", json={"query": "Q k1 ?", "documents": long_documents})
    assert response.status_code == 413 and "exceed" in response.json()["detail"]


def test_roles_leave_out_their_routes(service: Any) -> None:
    import pytest

    from ragkv.integrations.service_app import ServiceState, create_app
    from ragkv.kvstore import ConfigError

    def paths(role: str) -> set[str]:
        state = ServiceState(runtime=service.state.runtime, registry=service.state.registry, role=role)
        return set(create_app(state).openapi()["paths"])

    assert {"/v1/prefill", "/v1/decode", "/v1/generate"} <= paths("both")
    assert "/v1/prefill" in paths("prefill") and not {"/v1/decode", "/v1/generate"} & paths("prefill")
    assert "/v1/decode" in paths("decode") and not {"/v1/prefill", "/v1/warm", "/v1/generate"} & paths("decode")
    with pytest.raises(ConfigError):
        create_app(ServiceState(runtime=service.state.runtime, registry=service.state.registry, role="bogus"))
