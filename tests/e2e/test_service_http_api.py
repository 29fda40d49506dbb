"""The REST service over real HTTP: chunks, warm, generate (JSON and SSE), chat completions, observability."""
from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from unique_text import unique_words

from ragkv.kvstore import read_header


def _texts(n: int = 3) -> list[str]:
    tag = uuid.uuid4().int % 50
    fresh = unique_words()  # unique per call, so first requests are cold (tag alone repeats: 1 in 50)
    return [f"k{(tag + i) % 64} v{(tag * 3 + i) % 64} ; the k{(tag + 7 * i + 1) % 64} v{i} ; see {fresh}"
            for i in range(n)]


def _sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        raw = "\n".join(data)
        events.append((name, raw if raw == "[DONE]" else json.loads(raw)))
    return events


def test_health_and_schema_are_public(service: Any) -> None:
    with service.client(None) as anonymous:
        health = anonymous.get("/healthz").json()
        assert health["status"] == "ok" and health["auth"] is True and health["model"]["kind"] == "random-init"
        assert "random" in health["model"]["label"]
        paths = anonymous.get("/openapi.json").json()["paths"]
    for path in ("/v1/chunks/{key}", "/v1/chunks/lookup", "/v1/warm", "/v1/generate", "/v1/chat/completions",
                 "/v1/stats", "/healthz", "/metrics", "/"):
        assert path in paths
    assert {"get", "put", "head", "delete"} <= set(paths["/v1/chunks/{key}"])


def test_warm_then_generate_hits_and_reports_the_ttft_split(alice: httpx.Client) -> None:
    texts = _texts()
    warm = alice.post("/v1/warm", json={"texts": texts}).json()
    assert warm["namespace"] == "alice" and warm["computed"] == 3 and len(warm["keys"]) == 3
    assert alice.post("/v1/warm", json={"texts": texts}).json()["already_cached"] == 3
    body = {"query": "Q k1 ?", "documents": texts, "max_new_tokens": 4}
    out = alice.post("/v1/generate", json=body).json()
    assert [d["hit"] for d in out["documents"]] == [True] * 3 and {d["tier"] for d in out["documents"]} == {"host"}
    assert [d["key"] for d in out["documents"]] == warm["keys"] and out["strategy"] == "blend"
    assert out["ttft_ms"] > 0 and {"prepare", "first_token", "ttft"} <= set(out["timings_ms"])
    assert out["usage"]["completion_tokens"] >= 1 and out["model"]
    by_key = alice.post("/v1/generate", json={**body, "documents": [{"key": k} for k in warm["keys"]]}).json()
    assert by_key["answer"] == out["answer"] and all(d["hit"] for d in by_key["documents"])
    full = alice.post("/v1/generate", json={**body, "strategy": "full"}).json()
    assert full["strategy"] == "full" and not any(d["hit"] for d in full["documents"])


def test_cold_documents_are_computed_stored_and_hit_next_time(alice: httpx.Client) -> None:
    body = {"query": "Q k2 ?", "documents": [{"text": t} for t in _texts(2)], "max_new_tokens": 2,
            "strategy": "reuse"}
    first = alice.post("/v1/generate", json=body).json()
    assert [d["source"] for d in first["documents"]] == ["computed", "computed"]
    second = alice.post("/v1/generate", json=body).json()
    assert all(d["hit"] for d in second["documents"])


def test_streaming_generate_is_server_sent_events(alice: httpx.Client) -> None:
    body = {"query": "Q k3 ?", "documents": _texts(2), "max_new_tokens": 6, "stream": True}
    response = alice.post("/v1/generate", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _sse(response.text)
    assert events[-1][0] == "done" and all(name == "token" for name, _ in events[:-1])
    assert "".join(data["text"] for _, data in events[:-1]) == events[-1][1]["answer"]
    plain = alice.post("/v1/generate", json={**body, "stream": False}).json()
    assert plain["answer"] == events[-1][1]["answer"]


def test_chat_completions_openai_shape_and_stream(alice: httpx.Client) -> None:
    docs = _texts(2)
    body = {"model": "anything", "messages": [{"role": "system", "content": "the"},
                                              {"role": "user", "content": [{"type": "text", "text": "Q k4 ?"}]}],
            "documents": docs, "max_tokens": 5, "temperature": 0, "user": "ignored-field"}
    out = alice.post("/v1/chat/completions", json=body).json()
    served = alice.get("/v1/models").json()
    assert served["object"] == "list" and len(served["data"]) == 1
    assert out["object"] == "chat.completion" and out["model"] == served["data"][0]["id"]  # not the client's name
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert len(out["ragkv"]["documents"]) == 2
    stream = alice.post("/v1/chat/completions", json={**body, "stream": True})
    events = _sse(stream.text)
    assert events[-1][1] == "[DONE]"
    chunks = [data for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"] and chunks[-1]["choices"][0]["finish_reason"] is not None
    assert all("usage" not in c for c in chunks)
    with_usage = _sse(alice.post("/v1/chat/completions", json={**body, "stream": True,
                                                               "stream_options": {"include_usage": True}}).text)
    last = with_usage[-2][1]
    assert last["choices"] == [] and last["usage"] == out["usage"]


def test_chat_turns_keep_roles_and_order(alice: httpx.Client) -> None:
    docs = _texts(2)
    turns = [{"role": "user", "content": "Q k4 ?"}, {"role": "assistant", "content": "v1"},
             {"role": "user", "content": "Q k9 ?"}]
    out = alice.post("/v1/chat/completions", json={"messages": turns, "documents": docs, "max_tokens": 2}).json()
    single = alice.post("/v1/chat/completions", json={"messages": turns[-1:], "documents": docs,
                                                      "max_tokens": 2}).json()
    # the plain layout writes earlier turns as "role: text" lines before the question: a longer prompt
    assert out["usage"]["prompt_tokens"] > single["usage"]["prompt_tokens"]
    generate = alice.post("/v1/generate", json={"query": "Q k9 ?", "documents": docs, "max_new_tokens": 2,
                                                "history": turns[:2]}).json()
    assert generate["usage"]["prompt_tokens"] == out["usage"]["prompt_tokens"]
    ends_with_assistant = alice.post("/v1/chat/completions", json={"messages": turns[:2], "documents": docs})
    assert ends_with_assistant.status_code == 422 and "last message" in ends_with_assistant.text


def test_chunk_blob_round_trip(alice: httpx.Client) -> None:
    key = alice.post("/v1/warm", json={"texts": _texts(1)}).json()["keys"][0]
    got = alice.get(f"/v1/chunks/{key}")
    assert got.status_code == 200 and got.headers["content-type"] == "application/octet-stream"
    assert int(got.headers["content-length"]) == len(got.content)
    header = read_header(got.content)
    head = alice.head(f"/v1/chunks/{key}")
    assert head.status_code == 200 and head.headers["x-ragkv-tier"] == "host"
    assert int(head.headers["content-length"]) == len(got.content)
    assert alice.delete(f"/v1/chunks/{key}").status_code == 204
    assert alice.get(f"/v1/chunks/{key}").status_code == 404
    assert alice.head(f"/v1/chunks/{key}").status_code == 404
    assert alice.delete(f"/v1/chunks/{key}").status_code == 404
    put = alice.put(f"/v1/chunks/{key}", content=got.content, headers={"content-type": "application/octet-stream"},
                    params={"ttl_s": 3600})
    assert put.status_code == 201 and put.json()["tokens"] == len(header.meta.token_ids)
    back = read_header(alice.get(f"/v1/chunks/{key}").content)
    assert back.meta == header.meta and back.expires_at is not None
    looked = alice.post("/v1/chunks/lookup", json={"keys": [key, "alice:absent"]}).json()["results"]
    assert [(r["present"], r["tier"]) for r in looked] == [(True, "disk"), (False, None)]  # host refills on use


def test_large_chunk_streams_with_content_length(service: Any, alice: httpx.Client,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from ragkv.codecs import get_codec
    from ragkv.integrations import service_chunks
    from ragkv.kvstore import ChunkKV, ChunkMeta, encode_entry

    monkeypatch.setattr(service_chunks, "DOWNLOAD_SLICE", 64 << 10)  # the blob below spans several slices
    adapter = service.state.runtime.adapter
    ids = [7 + (uuid.uuid4().int + i) % 50 for i in range(600)]
    shape = (adapter.num_layers, 2, adapter.num_kv_heads, len(ids), adapter.head_dim)
    meta = ChunkMeta(str(adapter.fingerprint), tuple(ids), position=1, dtype=adapter.dtype_name)
    key = service.state.runtime.engine.cacher.key(ids, "alice")
    blob = encode_entry(ChunkKV(torch.randn(shape).to(adapter.dtype), meta), get_codec("raw"), key=key)
    assert alice.put(f"/v1/chunks/{key}", content=blob, headers={"content-type": "application/octet-stream"}
                     ).status_code == 201
    with alice.stream("GET", f"/v1/chunks/{key}") as response:
        assert int(response.headers["content-length"]) == len(blob)
        pieces = list(response.iter_bytes())
    assert b"".join(pieces) == blob


def test_stats_metrics_and_status_page(service: Any, alice: httpx.Client) -> None:
    alice.post("/v1/generate", json={"query": "Q k5 ?", "documents": _texts(1), "max_new_tokens": 1})
    stats = alice.get("/v1/stats").json()
    assert stats["tenant"] == "alice" and stats["namespace"] == "alice"
    assert set(stats["store"]["tiers"]) == {"host", "disk"} and stats["service"]["answers"] >= 1
    assert stats["calibration"] == service.state.runtime.calibration_summary()  # None unless `ragkv calibrate` ran
    assert stats["near_duplicates"]["enabled"] is False and stats["near_duplicates"]["hits"] == 0  # off by default
    with service.client(None) as anonymous:
        metrics = anonymous.get("/metrics")
        page = anonymous.get("/")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "ragkv_http_requests_total{" in metrics.text and "ragkv_ttft_seconds_bucket{" in metrics.text
    assert 'ragkv_tier_used_bytes{tier="host"}' in metrics.text
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for figure in ("fig-hit-rates", "fig-tier-usage", "fig-ttft"):
        assert f'id="{figure}"' in page.text
    assert "sk-alice" not in page.text and "alice" not in page.text  # aggregates only


def test_chunk_traffic_flows_while_a_generation_runs(alice: httpx.Client, service: Any) -> None:
    key = alice.post("/v1/warm", json={"texts": _texts(1)}).json()["keys"][0]
    with ThreadPoolExecutor(9) as pool:
        gen = pool.submit(alice.post, "/v1/generate", json={"query": "Q k6 ?", "documents": _texts(4),
                                                          "max_new_tokens": 32})
        gets = [pool.submit(alice.get, f"/v1/chunks/{key}") for _ in range(16)]
        assert all(g.result().status_code == 200 for g in gets)
        assert gen.result().status_code == 200


def test_unmatched_traffic_does_not_grow_state(service: Any, alice: httpx.Client) -> None:
    metrics = service.state.metrics
    for i in range(150):
        alice.get(f"/nope/{uuid.uuid4().hex}")
        alice.get(f"/v1/chunks/alice:{uuid.uuid4().hex}")
    before = (len(metrics.requests), len(metrics.durations))
    for i in range(150):
        alice.get(f"/nope/{uuid.uuid4().hex}/{i}")
        alice.get(f"/v1/chunks/alice:{uuid.uuid4().hex}")
    assert (len(metrics.requests), len(metrics.durations)) == before


def test_concurrent_streaming_chats_share_decode_steps_and_are_metered(service: Any, alice: httpx.Client) -> None:
    docs = _texts(2)
    body = {"messages": [{"role": "user", "content": "Q k4 ?"}], "documents": docs, "max_tokens": 24,
            "stream": True, "stop": []}
    steps_before = sum(service.state.runtime.scheduler.batch_sizes.values())
    with ThreadPoolExecutor(6) as pool:
        streams = list(pool.map(lambda _: alice.post("/v1/chat/completions", json=body), range(6)))
    assert all(r.status_code == 200 for r in streams)
    texts = {"".join(c["choices"][0]["delta"].get("content", "") for _, c in _sse(r.text)[:-1]) for r in streams}
    assert len(texts) == 1  # greedy: the same answer for every client, batched or not
    sizes = service.state.runtime.scheduler.batch_sizes
    assert sum(sizes.values()) > steps_before and max(sizes) >= 2
    with service.client(None) as anonymous, service.client("admin") as admin, service.client("bob") as bob:
        text = anonymous.get("/metrics").text
        by_tenant = admin.get("/metrics").text
        not_admin = bob.get("/metrics").text
    assert 'ragkv_answers_total{endpoint="chat"}' in text and "alice" not in text  # aggregates for anyone
    assert 'ragkv_answer_ttft_seconds_bucket{endpoint="chat",le="+Inf"}' in text and "alice" not in not_admin
    assert 'ragkv_answers_total{tenant="alice",endpoint="chat"}' in by_tenant  # by tenant for an admin
    assert 'ragkv_answer_ttft_seconds_bucket{tenant="alice",endpoint="chat",le="+Inf"}' in by_tenant
    assert 'ragkv_answer_tokens_per_second_count{tenant="alice",endpoint="chat"}' in by_tenant
    assert 'ragkv_scheduler_queue_depth{queue="generate"} 0' in text and "ragkv_scheduler_batch_size 0" in text
    count = next(line for line in text.splitlines() if line.startswith("ragkv_decode_batch_size_count"))
    alone_steps = next(line for line in text.splitlines()
                       if line.startswith('ragkv_decode_batch_size_bucket{le="1.0"}'))
    assert int(count.split()[-1]) > int(alone_steps.split()[-1])  # some steps decoded more than one sequence


def test_a_large_warm_never_turns_concurrent_generates_into_errors(alice: httpx.Client) -> None:
    fresh = uuid.uuid4().hex[:6]
    corpus = [f"k{i % 64} v{(i * 7) % 64} ; the k{(i * 3) % 64} v{i % 64} ; doc {fresh} {i}" for i in range(96)]
    with ThreadPoolExecutor(8) as pool:
        warms = [pool.submit(alice.post, "/v1/warm", json={"texts": corpus[i:i + 32]}) for i in range(0, 96, 32)]
        gens = [pool.submit(alice.post, "/v1/generate", json={"query": f"Q k{i} ?", "documents": _texts(2),
                                                             "max_new_tokens": 4}) for i in range(4)]
        assert [g.result().status_code for g in gens] == [200] * 4
        assert [w.result().status_code for w in warms] == [200] * 3
    reports = [w.result().json() for w in warms]
    assert sum(r["computed"] + r["already_cached"] for r in reports) == 96 and sum(r["computed"] for r in reports)
