"""RagRuntime: answers over texts and keys, misses stored then hit, refusals, strategy parameters, budgets."""
from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from ragkv.integrations.answers import (
    AnswerRequest,
    Document,
    Forbidden,
    GenerationOptions,
    NotFound,
    Overloaded,
    readable_namespaces,
)
from ragkv.integrations.strategy_params import config_from_params
from ragkv.kvstore import SHARED_NAMESPACE, ChunkKV, ChunkMeta, ConfigError, ModelMismatch


def _request(ns: str, query: str, docs: list[Document], **kw: Any) -> AnswerRequest:
    return AnswerRequest(query=query, documents=docs, namespace=ns, readable_namespaces=readable_namespaces(ns),
                         generation=kw.pop("generation", GenerationOptions(max_new_tokens=3)), **kw)


def _ns() -> str:
    return "t" + uuid.uuid4().hex[:8]


def test_miss_is_computed_stored_then_hit(tiny_runtime: Any, sample: Any) -> None:
    ns = _ns()
    q = sample.questions[0]
    docs = [Document(text=c) for c in q.chunks]
    first = tiny_runtime.answer(_request(ns, q.question, docs))
    assert [d.hit for d in first.documents] == [False] * len(docs)
    assert all(d.key.startswith(ns + ":") for d in first.documents)
    second = tiny_runtime.answer(_request(ns, q.question, docs))
    assert all(d.hit and d.tier == "host" for d in second.documents)
    assert second.text == first.text  # greedy, same model: the cached KV answers like the computed one
    assert second.prompt_tokens == first.prompt_tokens > sum(d.tokens for d in second.documents)
    assert {"prepare", "first_token", "ttft", "total"} <= set(second.timings_ms)
    assert second.ttft_s > 0 and second.completion_tokens >= 1


def test_warm_then_answer_hits_and_keys_are_content_hashes(tiny_runtime: Any) -> None:
    ns = _ns()
    texts = ["k1 v2 ; the", "k3 v4 ; of"]
    report = tiny_runtime.warm(texts, ns)
    assert report.computed == 2 and report.keys == [tiny_runtime.key_for(t, ns) for t in texts]
    again = tiny_runtime.warm(texts, ns)
    assert again.computed == 0 and again.already_cached == 2
    answer = tiny_runtime.answer(_request(ns, "Q k1 ?", [Document(text=t) for t in texts]))
    assert all(d.hit for d in answer.documents) and [d.key for d in answer.documents] == report.keys


def test_documents_by_key_resolve_to_their_tokens(tiny_runtime: Any) -> None:
    ns = _ns()
    key = tiny_runtime.warm(["k5 v6 ; see k7 v8 ;"], ns).keys[0]
    by_key = tiny_runtime.answer(_request(ns, "Q k5 ?", [Document(key=key)]))
    by_text = tiny_runtime.answer(_request(ns, "Q k5 ?", [Document(text="k5 v6 ; see k7 v8 ;")]))
    assert by_key.documents[0].key == key and by_key.documents[0].hit
    assert by_key.text == by_text.text


def test_keys_outside_readable_namespaces_are_refused_before_the_store(tiny_runtime: Any) -> None:
    other = _ns()
    key = tiny_runtime.warm(["k9 v10 ;"], other).keys[0]
    with pytest.raises(Forbidden):
        tiny_runtime.answer(_request(_ns(), "Q k9 ?", [Document(key=key)]))
    with pytest.raises(NotFound):
        tiny_runtime.answer(_request(other, "Q k9 ?", [Document(key=f"{other}:" + "0" * 40)]))
    shared = tiny_runtime.warm(["k11 v12 ;"], SHARED_NAMESPACE).keys[0]
    assert tiny_runtime.answer(_request(_ns(), "Q k11 ?", [Document(key=shared)])).documents[0].tokens == 3


def test_chunk_of_another_model_is_refused(tiny_runtime: Any) -> None:
    import torch

    ns = _ns()
    kv = torch.zeros(3, 2, 2, 2, 16)
    tiny_runtime.store.put(f"{ns}:foreign", ChunkKV(kv, ChunkMeta("some-other-model", (5, 6), position=1)))
    with pytest.raises(ModelMismatch):
        tiny_runtime.answer(_request(ns, "Q k1 ?", [Document(key=f"{ns}:foreign")]))


@pytest.mark.parametrize("strategy", ["full", "prefix", "reuse", "blend", "compress", "auto"])
def test_every_strategy_answers(tiny_runtime: Any, sample: Any, strategy: str) -> None:
    q = sample.questions[1]
    answer = tiny_runtime.answer(_request(_ns(), q.question, [Document(text=c) for c in q.chunks],
                                          strategy=strategy))
    assert answer.strategy == strategy and len(answer.documents) == len(q.chunks)


def test_strategy_params_convert_from_json(tiny_runtime: Any) -> None:
    from ragkv.middleware.blend import BlendConfig
    from ragkv.middleware.controller import AutoConfig

    config = config_from_params(BlendConfig, {"ratio": 0.3, "check_layers": [1, 2], "schedule": [0.5, 0.3]})
    assert config.ratio == 0.3 and config.check_layers == (1, 2) and config.schedule == (0.5, 0.3)
    nested = config_from_params(AutoConfig, {"max_ratio": 0.4, "blend": {"ratio": 0.2}})
    assert nested.blend.ratio == 0.2
    for bad in ({"nope": 1}, {"ratio": "high"}, {"ratio": 2.0}, {"check_layers": "1"}, {"selector": 3},
                {"check_layers": [True]}):
        with pytest.raises(ConfigError):
            config_from_params(BlendConfig, bad)
    answer = tiny_runtime.answer(_request(_ns(), "Q k1 ?", [Document(text="k1 v2 ;")], strategy="blend",
                                          strategy_params={"ratio": 0.5}))
    assert answer.strategy == "blend"


def test_budgets_refuse_oversized_requests(tiny_runtime: Any) -> None:
    long_text = " ".join(["the"] * (tiny_runtime.max_chunk_tokens + 1))
    with pytest.raises(ConfigError, match="limit"):
        tiny_runtime.answer(_request(_ns(), "Q k1 ?", [Document(text=long_text)]))
    with pytest.raises(ConfigError, match="limit"):
        tiny_runtime.warm([long_text], _ns())
    near = " ".join(["the"] * 1000)
    with pytest.raises(ConfigError, match="limit"):  # 1024 positions: prompt + max_new_tokens must fit
        tiny_runtime.answer(_request(_ns(), "Q k1 ?", [Document(text=near)],
                                     generation=GenerationOptions(max_new_tokens=64)))
    with pytest.raises(ConfigError, match="at least one token"):
        tiny_runtime.answer(_request(_ns(), "   ", []))


def test_generation_options_map_to_the_middleware() -> None:
    greedy = GenerationOptions(max_new_tokens=5, temperature=0).to_config()
    assert not greedy.do_sample and greedy.max_new_tokens == 5
    sampled = GenerationOptions(temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=(";",)).to_config()
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_k == 5 and sampled.stop_strings == (";",)


def test_streaming_callback_receives_the_answer_text(tiny_runtime: Any) -> None:
    pieces: list[str] = []
    answer = tiny_runtime.answer(_request(_ns(), "Q k1 ?", [Document(text="k1 v2 ;")],
                                          generation=GenerationOptions(max_new_tokens=4)), on_token=pieces.append)
    assert "".join(pieces) == answer.text


def test_waiting_list_is_bounded(tiny_loaded: Any) -> None:
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.kvstore import TieredStore

    runtime = RagRuntime(tiny_loaded, TieredStore("host:64MB"), own_store=True, max_waiting=1, wait_timeout_s=5)
    with runtime:
        busy, release = threading.Event(), threading.Event()

        def hold_the_model() -> None:
            busy.set()
            release.wait(10)

        holder = threading.Thread(target=runtime.scheduler.warm, args=([hold_the_model],))
        holder.start()
        assert busy.wait(10)
        request = _request(_ns(), "Q k1 ?", [Document(text="k1 v2 ;")], generation=GenerationOptions(max_new_tokens=2))
        answers: list[Any] = []
        waiter = threading.Thread(target=lambda: answers.append(runtime.answer(request)))
        waiter.start()
        for _ in range(500):
            if runtime.waiting == 1:
                break
            threading.Event().wait(0.01)
        with pytest.raises(Overloaded) as refused:
            runtime.answer(request)
        assert refused.value.retry_after_s > 0
        release.set()
        waiter.join(10)
        holder.join(10)
        assert len(answers) == 1 and answers[0].completion_tokens >= 1


def test_a_request_not_started_in_time_is_refused(tiny_loaded: Any) -> None:
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.kvstore import TieredStore

    with RagRuntime(tiny_loaded, TieredStore("host:64MB"), own_store=True, wait_timeout_s=0.3) as runtime:
        busy, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=runtime.scheduler.warm, args=([lambda: (busy.set(), release.wait(10))],))
        holder.start()
        assert busy.wait(10)
        with pytest.raises(Overloaded, match="busy"):
            runtime.answer(_request(_ns(), "Q k1 ?", [Document(text="k1 v2 ;")]))
        assert runtime.waiting == 0  # the refused request left the queue
        release.set()
        holder.join(10)


def test_near_duplicate_documents_are_reported_in_answers_and_stats(tiny_loaded: Any) -> None:
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.kvstore import TieredStore

    store = TieredStore("host:64MB")
    text = " ".join(f"k{i % 60} v{(i * 7) % 60} ;" for i in range(40))
    with RagRuntime(tiny_loaded, store, near_duplicates=True, use_calibration=False) as runtime:
        runtime.warm([text], "alice")
        edited = text.replace("k5 v35", "k6 v35", 1)
        answer = runtime.answer(_request("alice", "Q k5 ?", [Document(text=edited)], strategy="reuse"))
        doc = answer.documents[0]
        assert doc.source == "near-duplicate" and doc.near_duplicate_of == runtime.key_for(text, "alice")
        assert 0 < doc.repaired_tokens < doc.tokens
        summary = runtime.near_duplicate_summary()
        assert summary["enabled"] and summary["hits"] == 1 and summary["indexed"] == 2
    with RagRuntime(tiny_loaded, store, near_duplicates=True, use_calibration=False) as again:
        assert again.near_duplicate_summary()["indexed"] == 2  # rebuilt from the stored chunks
    with RagRuntime(tiny_loaded, store, own_store=True, use_calibration=False) as plain:
        assert plain.near_duplicate_summary() == {**plain.near_duplicate_summary(), "enabled": False, "indexed": 0}
