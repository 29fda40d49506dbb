"""Attacks that once worked against the service, each now refused (issue: hardening).

Poisoning the shared namespace with a blob under the right metadata; PUTs under keys that are not the
content hash; pinning by anyone; no quotas; a prefix cache shared across tenants; NaN, Infinity and lone
surrogates turning validation errors into 500s that also dropped the keep-alive connection; bodies that
never arrive holding a connection forever.
"""
from __future__ import annotations

import socket
import time
import uuid
from typing import Any

import httpx
import torch
from unique_text import unique_words

from ragkv.codecs import get_codec
from ragkv.kvstore import ChunkKV, encode_entry, read_header

OCTET = {"content-type": "application/octet-stream"}
JSON_HEADERS = {"content-type": "application/json"}


def _text(tag: str) -> str:
    return f"k{uuid.uuid4().int % 64} v{uuid.uuid4().int % 64} ; {tag} {unique_words()}"


def _tampered(blob: bytes, keep_key: bool = True) -> bytes:
    """The same metadata with different KV (what a poisoner would send), re-framed with a valid checksum."""
    from ragkv.kvstore import decode_entry

    header, chunk = decode_entry(blob)
    return encode_entry(ChunkKV(torch.randn_like(chunk.kv) * 5, chunk.meta), get_codec("raw"),
                        header.expires_at, header.key if keep_key else None)


def test_shared_chunks_cannot_be_poisoned(service: Any, alice: httpx.Client, bob: httpx.Client) -> None:
    text = _text("published")
    key = alice.post("/v1/warm", json={"texts": [text], "shared": True}).json()["keys"][0]
    request = {"query": "Q k1 ?", "documents": [text], "strategy": "reuse", "max_new_tokens": 4}
    before = bob.post("/v1/generate", json=request).json()
    genuine = bob.get(f"/v1/chunks/{key}").content
    poison = _tampered(genuine)
    for attacker in ("alice", "bob", "reader"):  # publishing or not: binary PUT into shared needs admin
        with service.client(attacker) as client:
            assert client.put(f"/v1/chunks/{key}", content=poison, headers=OCTET).status_code == 403
    again = alice.post("/v1/warm", json={"texts": [text], "shared": True}).json()
    assert again["already_cached"] == 1 and again["computed"] == 0  # a published entry is never recomputed over
    assert bob.get(f"/v1/chunks/{key}").content == genuine
    assert bob.post("/v1/generate", json=request).json()["answer"] == before["answer"]


def test_put_must_match_the_served_model_and_the_content_key(service: Any, alice: httpx.Client) -> None:
    text = _text("own")
    key = alice.post("/v1/warm", json={"texts": [text]}).json()["keys"][0]
    blob = alice.get(f"/v1/chunks/{key}").content
    header = read_header(blob)
    other = "alice:" + "0" * 40  # a well-formed key that is not this blob's content hash
    unbound = _tampered(blob, keep_key=False)  # no key in the header: only the content hash check can refuse it
    assert alice.put(f"/v1/chunks/{other}", content=unbound, headers=OCTET).status_code == 422
    from dataclasses import replace

    from ragkv.kvstore import decode_entry

    _, chunk = decode_entry(blob)
    foreign = encode_entry(ChunkKV(chunk.kv, replace(header.meta, fingerprint="another-model")), get_codec("raw"),
                           key=key)
    assert alice.put(f"/v1/chunks/{key}", content=foreign, headers=OCTET).status_code == 422
    shifted = encode_entry(ChunkKV(chunk.kv, replace(header.meta, position=9)), get_codec("raw"), key=key)
    assert alice.put(f"/v1/chunks/{key}", content=shifted, headers=OCTET).status_code == 422
    assert alice.get(f"/v1/chunks/{key}").content == blob  # every refusal left the stored value alone
    with service.client("admin") as admin:  # even an admin stores only the content key of what it sends
        shared_key = service.state.runtime.engine.cacher.key(list(header.meta.token_ids), "shared")
        assert admin.put(f"/v1/chunks/{shared_key}", content=unbound, headers=OCTET).status_code == 201
        assert admin.put("/v1/chunks/shared:" + "0" * 40, content=unbound, headers=OCTET).status_code == 422
        assert admin.delete(f"/v1/chunks/{shared_key}").status_code == 204


def test_pinning_needs_the_pin_role(service: Any, alice: httpx.Client) -> None:
    assert alice.post("/v1/warm", json={"texts": [_text("pin")], "pin": True}).status_code == 403
    with service.client("admin") as admin:
        assert admin.post("/v1/warm", json={"texts": [_text("pin")], "pin": True}).status_code == 200


def test_quotas_refuse_writes_past_them(service: Any) -> None:
    quota = service.state.registry.authenticate(service.keys["small"]).quota_bytes
    with service.client("small") as small:
        pinned = small.post("/v1/warm", json={"texts": [_text("pinned " + "word " * 32)], "pin": True})
        assert pinned.status_code == 413 and "pinned quota" in pinned.json()["detail"]
        assert small.post("/v1/warm", json={"texts": [_text("pinned")], "pin": True}).status_code == 200
        texts = [_text("quota " + "word " * 20) for _ in range(40)]
        statuses = [small.post("/v1/warm", json={"texts": [t]}).status_code for t in texts]
        assert 413 in statuses and statuses[0] == 200
        usage = small.get("/v1/stats").json()["usage"]
        assert usage["bytes"] <= quota and usage["quota_bytes"] == quota
        first = statuses.index(413)
        assert all(s == 413 for s in statuses[first:])  # nothing more fits until something is deleted
        refused = small.post("/v1/warm", json={"texts": [_text("quota " + "word " * 20)]})
        assert refused.status_code == 413 and "quota" in refused.json()["detail"]
        answer = small.post("/v1/generate", json={"query": "Q k1 ?", "documents": [_text("over " + "word " * 20)],
                                                  "max_new_tokens": 1})
        assert answer.status_code == 200  # answers still come; their misses are just not stored
        assert small.get("/v1/stats").json()["usage"]["bytes"] == usage["bytes"]


def test_prefix_cache_is_per_tenant(alice: httpx.Client, bob: httpx.Client) -> None:
    body = {"query": f"Q k2 ? {uuid.uuid4().hex[:6]}", "documents": [_text("prefix")], "strategy": "prefix",
            "max_new_tokens": 1}
    alice.post("/v1/generate", json=body)
    assert alice.post("/v1/generate", json=body).json()["documents"][0]["source"] == "prefix"
    assert bob.post("/v1/generate", json=body).json()["documents"][0]["source"] != "prefix"  # not alice's


def test_per_tenant_metrics(service: Any, alice: httpx.Client, bob: httpx.Client) -> None:
    alice.post("/v1/generate", json={"query": "Q k1 ?", "documents": [_text("m")], "max_new_tokens": 1})
    mine = alice.get("/v1/stats").json()["tenant_metrics"]
    assert set(mine) == {"alice"} and mine["alice"]["answers"] >= 1 and mine["alice"]["documents"] >= 1
    with service.client("admin") as admin:
        everyone = admin.get("/v1/stats").json()["tenant_metrics"]
    assert {"alice"} <= set(everyone)


def _raw_exchange(url: str, requests: list[bytes], timeout_s: float = 10.0) -> list[bytes]:
    """Send requests one after another on ONE connection; the status lines of the answers that came back."""
    host, port = url.removeprefix("http://").split(":")
    statuses: list[bytes] = []
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        reader = sock.makefile("rb")
        for request in requests:
            try:
                sock.sendall(request)
                status = reader.readline()
            except OSError:
                break
            if not status:
                break
            statuses.append(status.split(b" ")[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
    return statuses


def _post(path: str, key: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_non_standard_json_gets_422_and_keeps_the_connection(service: Any) -> None:
    key = service.keys["alice"]
    bad_bodies = [b'{"query": "q", "temperature": NaN}', b'{"query": "q", "top_p": Infinity}',
                  b'{"query": "\\ud800", "max_new_tokens": "x"}', b'{"query": "\\ud800"}',
                  b'{"query": "q", "strategy_params": {"ratio": -Infinity}}',
                  b'{"query": "q", "documents": ' + b"[" * 2000 + b"]" * 2000 + b"}"]
    good = _post("/v1/chunks/lookup", key, b'{"keys": ["alice:x"]}')
    statuses = _raw_exchange(service.url, [m for body in bad_bodies for m in (_post("/v1/generate", key, body), good)])
    assert statuses == [b"422", b"200"] * len(bad_bodies)


def test_a_stalled_body_gets_408_instead_of_holding_the_connection(service: Any) -> None:
    host, port = service.url.removeprefix("http://").split(":")
    start = time.perf_counter()
    for content_type in ("application/json", "application/octet-stream"):
        path = "/v1/generate" if content_type == "application/json" else "/v1/chunks/alice:" + "1" * 40
        method = "POST" if content_type == "application/json" else "PUT"
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {service.keys['alice']}\r\n"
                         f"Content-Type: {content_type}\r\nContent-Length: 1000\r\n\r\n{{\"query\"".encode())
            answer = sock.recv(4096)
        assert answer.split(b" ")[1] == b"408", answer[:200]
    assert time.perf_counter() - start < 2 * service.limits["body_timeout_s"] + 10


def test_hostile_blob_corpus_over_http(service: Any, alice: httpx.Client) -> None:
    """Every codec's hostile blobs, made for the served model and alice's content keys: each PUT is stored
    (it looked well-formed) or refused with 4xx; every read after it is 200 or 404; nothing is a 5xx."""
    import resource

    from blob_corpus import Geometry, hostile_blobs

    runtime = service.state.runtime
    a = runtime.adapter
    geometry = Geometry(str(a.fingerprint), "alice", a.num_layers, a.num_kv_heads, a.head_dim, a.dtype,
                        key_of=lambda ids: runtime.engine.cacher.key(list(ids), "alice"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for name, key, blob in hostile_blobs(seed=3, flips=6, geometry=geometry):
        put = alice.put(f"/v1/chunks/{key}", content=blob, headers=OCTET)
        assert put.status_code in (201, 413, 422), (name, put.status_code, put.text[:200])
        assert alice.get(f"/v1/chunks/{key}").status_code in (200, 404), name
        assert alice.head(f"/v1/chunks/{key}").status_code in (200, 404), name
        answer = alice.post("/v1/generate", json={"query": "Q k1 ?", "documents": [{"key": key}], "max_new_tokens": 1})
        assert answer.status_code in (200, 404, 422), (name, answer.status_code, answer.text[:200])
        alice.delete(f"/v1/chunks/{key}")
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert growth < 256 << 20, f"the test process and its in-process server grew by {growth / 2**20:.0f} MiB"


def test_shared_true_never_publishes_what_the_tenant_holds_privately(service: Any, alice: httpx.Client) -> None:
    private, fresh = _text("private"), _text("fresh")
    private_key = alice.post("/v1/warm", json={"texts": [private]}).json()["keys"][0]
    answer = alice.post("/v1/generate", json={"query": "Q k1 ?", "documents": [private, fresh], "shared": True,
                                              "max_new_tokens": 1}).json()
    first, second = answer["documents"]
    assert first["hit"] and first["key"] == private_key  # found in alice's own namespace first
    assert not second["hit"] and second["key"].startswith("shared:")  # a real miss is published, as asked
    runtime = service.state.runtime
    shared_twin = runtime.key_for(private, "shared")
    assert alice.post("/v1/chunks/lookup", json={"keys": [shared_twin, second["key"]]}).json()["results"] == [
        {"key": shared_twin, "present": False, "tier": None},
        {"key": second["key"], "present": True, "tier": "host"}]
