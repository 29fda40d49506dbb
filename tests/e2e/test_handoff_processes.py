"""Prefill and decode in two real ``ragkv serve`` processes sharing a real Redis (or a disk directory): the
decode side's greedy answer equals a single process's."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_process import line_queue, lines_until, ragkv_command, stop

START_TIMEOUT_S = 120
QUERY = "Q k5 ?"
DOCUMENTS = [" ".join(f"k{(i * 7 + j) % 64} v{(i * 13 + 5 * j) % 64} ;" for j in range(10)) for i in range(3)]


@contextmanager
def _serve(role: str, store: str, cache: Path) -> Iterator[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAGKV_STORE"}
    env.update(RAGKV_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([*ragkv_command(), "serve", "--model", "toy", "--store", store, "--role", role,
                             "--port", "0", "--no-sample"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    seen: list[str] = []
    try:
        for line in lines_until(line_queue(proc.stdout), START_TIMEOUT_S):  # type: ignore[arg-type]
            seen.append(line)
            if "is serving on" in line:
                yield line.split("is serving on ", 1)[1].split()[0]
                return
        raise AssertionError("ragkv serve did not start:\n" + "\n".join(seen))
    finally:
        stop(proc)


def _single_process_answer(strategy: str) -> dict[str, Any]:
    from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions
    from ragkv.integrations.models import load_model
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.kvstore import TieredStore

    with RagRuntime(load_model("toy"), TieredStore("host:64MB"), own_store=True, use_calibration=False) as runtime:
        answer = runtime.answer(AnswerRequest(query=QUERY, documents=[Document(text=d) for d in DOCUMENTS],
                                              strategy=strategy, generation=GenerationOptions(max_new_tokens=8)))
    return answer.to_dict()


@pytest.mark.parametrize("shared_store", ["redis", "disk"])
def test_a_decode_process_answers_what_a_prefill_process_published(shared_store: str, redis_url: str,
                                                                    tmp_path: Path) -> None:
    store = redis_url if shared_store == "redis" else f"disk:{tmp_path / 'shared-disk'}"
    with _serve("prefill", store, tmp_path / "a") as prefill_url, _serve("decode", store, tmp_path / "b") as decode_url:
        with httpx.Client(base_url=prefill_url, timeout=60) as prefill, \
                httpx.Client(base_url=decode_url, timeout=60) as decode:
            published = prefill.post("/v1/prefill", json={"query": QUERY, "documents": DOCUMENTS, "strategy": "blend"})
            assert published.status_code == 200, published.text
            body = published.json()
            assert body["handle"].startswith("default:handoff-") and body["stored_bytes"] > 0
            assert [d["source"] for d in body["documents"]] == ["computed"] * 3
            answer = decode.post("/v1/decode", json={"handle": body["handle"], "max_new_tokens": 8})
            assert answer.status_code == 200, answer.text
            again = decode.post("/v1/decode", json={"handle": body["handle"]})
            assert again.status_code == 404  # a handle is used once
            assert prefill.post("/v1/decode", json={"handle": body["handle"]}).status_code == 404  # not its role
            assert decode.post("/v1/prefill", json={"query": QUERY}).status_code == 404
            assert decode.post("/v1/generate", json={"query": QUERY}).status_code == 404
    reference = _single_process_answer("blend")
    assert answer.json()["answer"] == reference["answer"]
    assert answer.json()["usage"]["completion_tokens"] == reference["usage"]["completion_tokens"]
