"""Prefill→decode hand-off through the store: a published context resumes elsewhere to the same greedy tokens."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ragkv.kvstore import TieredStore
from ragkv.kvstore.chunk import ChunkKV
from ragkv.kvstore.errors import ConfigError, CorruptEntry, ModelMismatch
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.context import PrepareRequest
from ragkv.middleware.engine import ContextEngine
from ragkv.middleware.generation import GenerationConfig
from ragkv.middleware.handoff import HandoffMissing, is_handoff_key

GREEDY = GenerationConfig(max_new_tokens=12, stop_token_ids=())


@pytest.fixture()
def adapter(word_tokenizer: Any, model_factory: Any) -> ModelAdapter:
    return ModelAdapter(model_factory("llama", seed=1, layers=4), word_tokenizer)


def _request(make_words: Any, namespace: str = "alice") -> PrepareRequest:
    return PrepareRequest(query=make_words(3, 5), chunks=[make_words(20, 30), make_words(40, 25)],
                          namespace=namespace)


@pytest.mark.parametrize("strategy", ["full", "reuse", "blend"])
def test_a_resumed_context_decodes_the_same_greedy_tokens(adapter: ModelAdapter, make_words: Any, tmp_path: Path,
                                                          strategy: str) -> None:
    store = TieredStore(f"disk:{tmp_path}?codec=zstd")  # an encoded tier: the entry goes through a codec
    prefill = ContextEngine(adapter, store)
    reference = prefill.generate(prefill.prepare(_request(make_words), strategy), GREEDY)
    handoff = prefill.publish(prefill.prepare(_request(make_words), strategy), "alice")
    assert is_handoff_key(handoff.key) and handoff.key.startswith("alice:handoff-")
    decode = ContextEngine(adapter, store)  # another engine: nothing shared but the store
    resumed = decode.resume(handoff.key)
    assert resumed.input_ids == reference_ids(prefill, strategy, make_words)
    result = decode.generate(resumed, GREEDY)
    assert result.token_ids == reference.token_ids and result.text == reference.text
    with pytest.raises(HandoffMissing):  # a handle is used once
        decode.resume(handoff.key)


def reference_ids(engine: ContextEngine, strategy: str, make_words: Any) -> list[int]:
    return engine.prepare(_request(make_words), strategy).input_ids


def test_refusals(adapter: ModelAdapter, make_words: Any, word_tokenizer: Any, model_factory: Any) -> None:
    store = TieredStore("host:64MB")
    engine = ContextEngine(adapter, store)
    with pytest.raises(ConfigError, match="compressed"):
        engine.publish(engine.prepare(_request(make_words), "compress"), "alice")
    with pytest.raises(ConfigError, match="hand-off key"):
        engine.resume("alice:0123abcd")
    with pytest.raises(HandoffMissing):
        engine.resume("alice:handoff-00000000000000000000000000000000")
    other = ContextEngine(ModelAdapter(model_factory("llama", seed=2, layers=4), word_tokenizer), store)
    handoff = engine.publish(engine.prepare(_request(make_words), "reuse"), "alice")
    with pytest.raises(ModelMismatch):
        other.resume(handoff)
    assert engine.resume(handoff).input_ids  # a mis-routed resume left it for the right model
    handoff = engine.publish(engine.prepare(_request(make_words), "reuse"), "alice")
    chunk = store.get(handoff.key)
    store.put(handoff.key, ChunkKV(chunk.kv, replace(chunk.meta, extra={**chunk.meta.extra, "last_token": -1})))
    with pytest.raises(CorruptEntry):
        engine.resume(handoff)


def test_a_handoff_expires_with_its_ttl(adapter: ModelAdapter, make_words: Any) -> None:
    engine = ContextEngine(adapter, TieredStore("host:64MB"))
    handoff = engine.publish(engine.prepare(_request(make_words), "reuse"), "alice", ttl_s=0.2)
    time.sleep(0.4)
    with pytest.raises(HandoffMissing):
        engine.resume(handoff)
