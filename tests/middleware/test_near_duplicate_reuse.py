"""Near-duplicate reuse in the engine: a miss repaired from a readable stored chunk, then an exact hit."""
from __future__ import annotations

from typing import Any

import pytest

from ragkv.kvstore import TieredStore
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.context import PrepareRequest
from ragkv.middleware.engine import ContextEngine, EngineConfig
from ragkv.middleware.near_duplicate_reuse import NearDuplicateConfig


@pytest.fixture()
def engine(word_tokenizer: Any, model_factory: Any) -> ContextEngine:
    config = EngineConfig(near_duplicates=NearDuplicateConfig(enabled=True))
    return ContextEngine(ModelAdapter(model_factory("llama", seed=1, layers=4), word_tokenizer),
                         TieredStore("host:256MB"), config)


def _edit(text: str, at: int, word: str) -> str:
    words = text.split()
    words[at] = word
    return " ".join(words)


def test_an_edited_document_is_repaired_from_the_stored_one_then_hit(engine: ContextEngine, make_words: Any) -> None:
    original = make_words(5, 60)
    engine.warm([original], namespace="alice")
    edited = _edit(original, 30, "w999")
    request = PrepareRequest(query=make_words(1, 4), chunks=[edited], namespace="alice")
    first = engine.prepare(request, "reuse").chunks[0]
    assert first.source == "near-duplicate" and not first.hit and first.stored
    assert first.near_duplicate_of == engine.cacher.key(engine.cacher.tokens(original), "alice")
    assert 0 < first.repaired_tokens < first.num_tokens
    again = engine.prepare(request, "blend").chunks[0]
    assert again.hit and again.source == "store"  # stored under its own key
    assert engine.near_duplicates.hits == 1


def test_another_tenants_chunk_is_never_a_near_duplicate(engine: ContextEngine, make_words: Any) -> None:
    original = make_words(7, 60)
    engine.warm([original], namespace="alice")
    request = PrepareRequest(query=make_words(1, 4), chunks=[_edit(original, 10, "w998")], namespace="bob")
    assert engine.prepare(request, "reuse").chunks[0].source == "computed"
    shared = PrepareRequest(query=make_words(1, 4), chunks=[_edit(original, 11, "w997")], namespace="bob",
                            lookup_namespaces=("bob", "alice"))  # a lookup order that names alice may read it
    assert engine.prepare(shared, "reuse").chunks[0].source == "near-duplicate"


def test_unlike_documents_and_the_default_config_compute(engine: ContextEngine, word_tokenizer: Any,
                                                         model_factory: Any, make_words: Any) -> None:
    engine.warm([make_words(5, 60)], namespace="alice")
    far = PrepareRequest(query=make_words(1, 4), chunks=[make_words(200, 60)], namespace="alice")
    assert engine.prepare(far, "reuse").chunks[0].source == "computed"
    plain = ContextEngine(engine.adapter, engine.store)  # off by default
    near = PrepareRequest(query=make_words(1, 4), chunks=[_edit(make_words(5, 60), 3, "w996")], namespace="alice")
    assert plain.prepare(near, "reuse").chunks[0].source == "computed"


def test_a_new_engine_indexes_what_the_store_already_holds(engine: ContextEngine, make_words: Any) -> None:
    original = make_words(9, 60)
    engine.warm([original], namespace="alice")
    fresh = ContextEngine(engine.adapter, engine.store, engine.config)
    assert fresh.near_duplicates.index_store(["alice"]) == 1
    request = PrepareRequest(query=make_words(1, 4), chunks=[_edit(original, 40, "w995")], namespace="alice")
    assert fresh.prepare(request, "reuse").chunks[0].source == "near-duplicate"
