"""Tenant isolation over real HTTP: a tenant never reads or deletes another tenant's private chunk, whatever
key it sends; the shared namespace is readable by all, writable with publish, deletable by admins."""
from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from unique_text import unique_words

OCTET = {"content-type": "application/octet-stream"}


def _private_chunk(client: httpx.Client) -> tuple[str, str, bytes]:
    text = f"k{uuid.uuid4().int % 64} v{uuid.uuid4().int % 64} ; private to its owner {unique_words()}"
    key = client.post("/v1/warm", json={"texts": [text]}).json()["keys"][0]
    blob = client.get(f"/v1/chunks/{key}").content
    return text, key, blob


def test_another_tenants_private_chunk_is_unreachable(alice: httpx.Client, bob: httpx.Client) -> None:
    _, key, blob = _private_chunk(alice)
    assert key.startswith("alice:")
    missing = "alice:" + "0" * 40
    for target in (key, missing):  # the same answer whether the chunk exists or not: existence does not leak
        assert bob.get(f"/v1/chunks/{target}").status_code == 403
        assert bob.head(f"/v1/chunks/{target}").status_code == 403
        assert bob.delete(f"/v1/chunks/{target}").status_code == 403
        assert bob.put(f"/v1/chunks/{target}", content=blob, headers=OCTET).status_code == 403
        assert bob.post("/v1/chunks/lookup", json={"keys": [f"bob:{uuid.uuid4().hex}", target]}).status_code == 403
        generate = bob.post("/v1/generate", json={"query": "Q k1 ?", "documents": [{"key": target}]})
        assert generate.status_code == 403
    assert alice.get(f"/v1/chunks/{key}").content == blob  # untouched


def test_same_text_gets_separate_keys_per_tenant(alice: httpx.Client, bob: httpx.Client) -> None:
    text, alice_key, _ = _private_chunk(alice)
    bob_warm = bob.post("/v1/warm", json={"texts": [text]}).json()
    assert bob_warm["namespace"] == "bob" and bob_warm["computed"] == 1  # not served from alice's entry
    bob_key = bob_warm["keys"][0]
    assert bob_key.startswith("bob:") and bob_key.split(":")[1] != alice_key.split(":")[1]
    answer = bob.post("/v1/generate", json={"query": "Q k1 ?", "documents": [text], "max_new_tokens": 1}).json()
    assert [d["key"] for d in answer["documents"]] == [bob_key]


@pytest.mark.parametrize("path", [
    "/v1/chunks/alice%3A{name}",          # an encoded colon decodes to alice's key
    "/v1/chunks/bob:..%2Falice:{name}",   # path tricks never reach another namespace
    "/v1/chunks/bob:{name}%00alice",
    "/v1/chunks/%20alice:{name}",
    "/v1/chunks/ALICE:{name}",
    "/v1/chunks/alice:{name}:x",
    "/v1/chunks/shared:..%2F..%2Falice:{name}",
])
def test_key_tricks_never_return_another_tenants_chunk(alice: httpx.Client, bob: httpx.Client, path: str) -> None:
    _, key, blob = _private_chunk(alice)
    name = key.split(":")[1]
    for method in ("GET", "HEAD", "DELETE"):
        response = bob.request(method, path.format(name=name))
        assert response.status_code in (403, 404, 422), (method, path, response.status_code)
        assert response.content != blob
    assert alice.get(f"/v1/chunks/{key}").content == blob


def test_shared_namespace_publish_read_and_admin_delete(service: Any, alice: httpx.Client, bob: httpx.Client) -> None:
    text = f"k3 v{uuid.uuid4().int % 64} ; published {unique_words()}"
    published = alice.post("/v1/warm", json={"texts": [text], "shared": True}).json()
    key = published["keys"][0]
    assert published["namespace"] == "shared" and key.startswith("shared:")
    blob = bob.get(f"/v1/chunks/{key}")
    assert blob.status_code == 200 and bob.head(f"/v1/chunks/{key}").status_code == 200
    assert bob.post("/v1/chunks/lookup", json={"keys": [key]}).json()["results"][0]["present"]
    for document in ({"key": key}, text):  # by key or by text: bob's namespace first, then shared
        shared_answer = bob.post("/v1/generate", json={"query": "Q k3 ?", "documents": [document],
                                                       "max_new_tokens": 1}).json()
        assert shared_answer["documents"][0]["hit"] and shared_answer["documents"][0]["key"] == key
    assert bob.post("/v1/chunks/lookup", json={"keys": [key.replace("shared:", "bob:")]}
                    ).json()["results"][0]["present"] is False  # nothing was recomputed into bob's namespace
    assert bob.delete(f"/v1/chunks/{key}").status_code == 403  # publishing is not owning
    assert alice.delete(f"/v1/chunks/{key}").status_code == 403  # nor is having published it
    with service.client("reader") as reader:
        assert reader.get(f"/v1/chunks/{key}").status_code == 200
        assert reader.post("/v1/warm", json={"texts": ["k1 v1 ;"], "shared": True}).status_code == 403
        assert reader.put(f"/v1/chunks/{key}", content=blob.content, headers=OCTET).status_code == 403
        assert reader.post("/v1/generate", json={"query": "Q k1 ?", "documents": ["k1 v1 ;"],
                                                 "shared": True}).status_code == 403
    assert alice.put(f"/v1/chunks/{key}", content=blob.content, headers=OCTET).status_code == 403  # not admin
    with service.client("admin") as admin:
        assert admin.get(f"/v1/chunks/{key}").status_code == 200
        assert admin.delete(f"/v1/chunks/{key}").status_code == 204
        assert admin.post("/v1/warm", json={"texts": ["k2 v2 ;"]}).json()["namespace"] == "ops"
    assert bob.get(f"/v1/chunks/{key}").status_code == 404


def test_admin_of_shared_still_cannot_touch_private_chunks(service: Any, alice: httpx.Client) -> None:
    _, key, _ = _private_chunk(alice)
    with service.client("admin") as admin:
        assert admin.get(f"/v1/chunks/{key}").status_code == 403
        assert admin.delete(f"/v1/chunks/{key}").status_code == 403
    assert alice.head(f"/v1/chunks/{key}").status_code == 200


def test_generate_stores_misses_in_the_callers_namespace_only(alice: httpx.Client, bob: httpx.Client) -> None:
    text = f"k4 v5 ; fresh {uuid.uuid4().hex[:6]}"
    out = bob.post("/v1/generate", json={"query": "Q k4 ?", "documents": [text], "max_new_tokens": 1}).json()
    key = out["documents"][0]["key"]
    assert key.startswith("bob:") and out["documents"][0]["source"] == "computed"
    alice_key = alice.post("/v1/warm", json={"texts": [text]}).json()
    assert alice_key["computed"] == 1 and alice_key["keys"][0] != key
