"""A service asked to record a trace appends each answered request, which the simulator then reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from unique_text import unique_words

from ragkv.integrations.sim_trace import TraceRecorder, read_trace


def test_answered_requests_are_recorded_as_a_trace(service: Any, alice: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    service.state.recorder = TraceRecorder(path)
    try:
        documents = [f"k{i} v{i + 1} ; the k{i + 5} v{i} ; see {unique_words()}" for i in range(2)]
        keys = alice.post("/v1/warm", json={"texts": documents}).json()["keys"]
        out = alice.post("/v1/generate", json={"query": "Q k1 ?", "documents": documents, "max_new_tokens": 2})
        assert out.status_code == 200
    finally:
        service.state.recorder.close()
        service.state.recorder = None
    (request,) = read_trace(path)
    assert request.namespace == "alice" and [k for k, _ in request.chunks] == keys
    assert [n for _, n in request.chunks] == [d["tokens"] for d in out.json()["documents"]]
    assert request.query_tokens == out.json()["usage"]["prompt_tokens"] - sum(n for _, n in request.chunks)
