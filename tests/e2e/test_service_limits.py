"""Limits over real HTTP: 401 (missing/invalid key), 415 (content type), 413 (body size), 422 (malformed keys,
bodies and parameters), each documented in the OpenAPI schema."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

OCTET = {"content-type": "application/octet-stream"}
JSON_HEADERS = {"content-type": "application/json"}
ROUTES = [("GET", "/v1/chunks/alice:x"), ("HEAD", "/v1/chunks/alice:x"), ("DELETE", "/v1/chunks/alice:x"),
          ("PUT", "/v1/chunks/alice:x"), ("POST", "/v1/chunks/lookup"), ("POST", "/v1/warm"),
          ("POST", "/v1/generate"), ("POST", "/v1/chat/completions"), ("GET", "/v1/stats")]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Bearer"},
                                     {"Authorization": "Basic <alice>"}, {"X-API-Key": "nope"},
                                     {"Authorization": "Bearer " + "x" * 5000}])
def test_missing_or_invalid_keys_get_401_on_every_v1_route(service: Any, headers: dict[str, str]) -> None:
    headers = {k: v.replace("<alice>", service.keys["alice"]) for k, v in headers.items()}  # right key, wrong scheme
    with httpx.Client(base_url=service.url, headers=headers, timeout=30) as client:
        for method, path in ROUTES:
            response = client.request(method, path, content=b"{}", headers={"content-type": "application/json"})
            assert response.status_code == 401, (method, path)
            assert response.headers.get("www-authenticate") == "Bearer"
        for public in ("/healthz", "/metrics", "/", "/openapi.json"):
            assert client.get(public).status_code == 200


def test_x_api_key_header_works(service: Any) -> None:
    with httpx.Client(base_url=service.url, headers={"X-API-Key": service.keys["bob"]}) as client:
        assert client.get("/v1/stats").json()["tenant"] == "bob"


def test_oversized_bodies_get_413(service: Any, alice: httpx.Client) -> None:
    big = b"{" + b" " * (service.limits["max_json_bytes"] + 10) + b"}"
    assert alice.post("/v1/generate", content=big, headers=JSON_HEADERS).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused once the stream outgrows the limit
        for _ in range(8):
            yield b" " * (64 << 10)

    streamed = alice.post("/v1/warm", content=chunks(), headers=JSON_HEADERS)
    assert streamed.status_code == 413
    blob = b"\x00" * (service.limits["max_chunk_bytes"] + 1)
    assert alice.put("/v1/chunks/alice:big", content=blob, headers=OCTET).status_code == 413
    assert alice.get("/v1/chunks/alice:big").status_code == 404  # nothing was stored


def test_wrong_content_types_get_415(alice: httpx.Client) -> None:
    body = b'{"query": "Q k1 ?"}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        headers = {"content-type": ctype} if ctype else {}
        assert alice.post("/v1/generate", content=body, headers=headers).status_code == 415, ctype
    assert alice.post("/v1/generate", content=body, headers={"content-type": "application/json; charset=utf-8"}
                      ).status_code == 200
    assert alice.put("/v1/chunks/alice:x", content=b"{}", headers=JSON_HEADERS).status_code == 415
    assert alice.put("/v1/chunks/alice:x", content=b"raw").status_code == 415


@pytest.mark.parametrize("key", ["nocolon", "a:b:c", "alice:", ":x", "alice:" + "x" * 129, "alice:a b",
                                 "alice:é", "alice:" + "%" * 3, "x" * 300])
def test_malformed_keys_get_422(alice: httpx.Client, key: str) -> None:
    for method in ("GET", "HEAD", "DELETE"):
        assert alice.request(method, f"/v1/chunks/{key}").status_code == 422, (method, key)
    assert alice.put(f"/v1/chunks/{key}", content=b"x", headers=OCTET).status_code == 422
    assert alice.post("/v1/chunks/lookup", json={"keys": [key]}).status_code == 422
    assert alice.post("/v1/generate", json={"query": "q", "documents": [{"key": key}]}).status_code == 422


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", b"{not json"),
    ("/v1/generate", b"[]"),
    ("/v1/generate", b'{"query": ""}'),
    ("/v1/generate", b'{"query": "q", "surprise": 1}'),
    ("/v1/generate", b'{"query": "q", "max_new_tokens": 33}'),
    ("/v1/generate", b'{"query": "q", "max_new_tokens": 0}'),
    ("/v1/generate", b'{"query": "q", "documents": [{"text": "a", "key": "alice:x"}]}'),
    ("/v1/generate", b'{"query": "q", "documents": [{}]}'),
    ("/v1/generate", (b'{"query": "q", "documents": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", '
                      b'"m", "n", "o", "p", "q"]}')),
    ("/v1/generate", b'{"query": "q", "strategy": "magic"}'),
    ("/v1/generate", b'{"query": "q", "strategy": "blend", "strategy_params": {"ratio": 7}}'),
    ("/v1/generate", b'{"query": "q", "strategy": "blend", "strategy_params": {"bogus": 1}}'),
    ("/v1/generate", b'{"query": "q", "stop": [""]}'),
    ("/v1/generate", b'{"query": "q", "temperature": 9}'),
    ("/v1/generate", b'{"query": "   "}'),
    ("/v1/generate", b'{"query": "q", "documents": ["   "]}'),
    ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "system", "content": "only a system"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "n": 2}'),
    ("/v1/warm", b'{"texts": []}'),
    ("/v1/warm", b'{"texts": ["ok", 3]}'),
    ("/v1/warm", b'{"texts": ["ok"], "ttl_s": -1}'),
    ("/v1/chunks/lookup", b'{"keys": "alice:x"}'),
    ("/v1/generate", b'{"query": "\xc3"}'),
    ("/v1/warm", b'\xff\xfe{}'),
])
def test_malformed_bodies_get_422(alice: httpx.Client, path: str, body: bytes) -> None:
    response = alice.post(path, content=body, headers=JSON_HEADERS)
    assert response.status_code == 422, response.text
    assert "detail" in response.json()


def test_bad_chunk_blobs_and_parameters_get_422(alice: httpx.Client) -> None:
    assert alice.put("/v1/chunks/alice:x", content=b"RGKV" + b"\x00" * 40, headers=OCTET).status_code == 422
    assert alice.put("/v1/chunks/alice:x", content=b"", headers=OCTET).status_code == 422
    assert alice.put("/v1/chunks/alice:x", content=b"x", headers=OCTET, params={"ttl_s": "-3"}).status_code == 422
    assert alice.get("/v1/chunks/alice:x").status_code == 404


def test_limits_are_documented_in_the_openapi_schema(service: Any) -> None:
    schema = httpx.get(service.url + "/openapi.json").json()
    paths = schema["paths"]
    expect = {("/v1/chunks/{key}", "put"): {"401", "403", "413", "415", "422"},
              ("/v1/chunks/{key}", "get"): {"401", "403", "404", "422"},
              ("/v1/chunks/{key}", "delete"): {"401", "403", "404", "422"},
              ("/v1/chunks/lookup", "post"): {"401", "413", "415", "422"},
              ("/v1/warm", "post"): {"401", "413", "415", "422", "429"},
              ("/v1/generate", "post"): {"401", "413", "415", "422", "429"},
              ("/v1/chat/completions", "post"): {"401", "413", "415", "422", "429"}}
    for (path, method), codes in expect.items():
        assert codes <= set(paths[path][method]["responses"]), (path, method)
    put_body = paths["/v1/chunks/{key}"]["put"]["requestBody"]["content"]
    assert list(put_body) == ["application/octet-stream"]
    schemes = schema["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
