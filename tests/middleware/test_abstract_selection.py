"""Chunk abstracts in the engine: stored beside each chunk, read back only when usable, and chunks far below the
others left out of the prompt without being fetched."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ragkv.codecs import get_codec
from ragkv.kvstore import TieredStore
from ragkv.kvstore.container import encode_entry
from ragkv.middleware.abstract_selection import AbstractsConfig, ChunkAbstracts
from ragkv.middleware.abstracts import ChunkAbstract, abstract_key
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.context import PrepareRequest
from ragkv.middleware.engine import ContextEngine, EngineConfig
from ragkv.middleware.near_duplicate_reuse import NearDuplicateConfig

LEAVE_OUT_ALL_BUT_ONE = AbstractsConfig(enabled=True, layers=2, threshold=0.0, min_chunks=3, min_kept=1)


@pytest.fixture()
def adapter(word_tokenizer: Any, model_factory: Any) -> ModelAdapter:
    return ModelAdapter(model_factory("llama", seed=1, layers=4), word_tokenizer)


def _engine(adapter: ModelAdapter, store: Any, abstracts: AbstractsConfig, **config: Any) -> ContextEngine:
    return ContextEngine(adapter, store, EngineConfig(abstracts=abstracts, **config))


def _docs(make_words: Any, n: int = 4) -> list[str]:
    return [make_words(10 + 7 * i, 20 + 3 * i) for i in range(n)]


def test_warm_stores_an_abstract_beside_each_chunk_in_its_namespace(adapter: ModelAdapter, make_words: Any) -> None:
    engine = _engine(adapter, TieredStore("host:256MB"), AbstractsConfig(enabled=True, layers=2))
    report = engine.warm(_docs(make_words, 3), namespace="alice")
    fresh = ChunkAbstracts(adapter, engine.store, AbstractsConfig(enabled=True, layers=2))  # nothing cached
    for key in report.keys:
        assert engine.store.contains(abstract_key(key)) and abstract_key(key).startswith("alice:")
        chunk = engine.store.get(key)
        read = fresh.read(key)
        expected = ChunkAbstract.from_kv(chunk.kv[:2], chunk.meta.position)
        assert read is not None and torch.equal(read.kmin, expected.kmin) and torch.equal(read.kmax, expected.kmax)
        assert read.num_tokens == chunk.num_tokens
    assert fresh.summary()["read"] == 3


def test_warm_and_misses_give_chunks_stored_without_one_their_abstract(adapter: ModelAdapter, make_words: Any) -> None:
    store = TieredStore("host:256MB")
    docs = _docs(make_words, 3)
    ContextEngine(adapter, store).warm(docs[:2])  # abstracts off
    engine = _engine(adapter, store, AbstractsConfig(enabled=True, layers=2))
    report = engine.warm(docs[:2])
    assert report.computed == 0 and all(store.contains(abstract_key(k)) for k in report.keys)
    infos = engine.prepare(PrepareRequest(query=make_words(1, 3), chunks=[docs[2]]), "reuse").chunks
    assert infos[0].source == "computed" and store.contains(abstract_key(infos[0].key))


def test_a_lossy_foreign_or_missing_abstract_reads_as_absent(adapter: ModelAdapter, make_words: Any,
                                                              tmp_path: Path) -> None:
    store = TieredStore(f"disk:{tmp_path}?codec=raw")  # an encoded tier: a blob stays as it was written
    engine = _engine(adapter, store, AbstractsConfig(enabled=True, layers=2))
    (key,) = engine.warm(_docs(make_words, 1)).keys
    abstracts = ChunkAbstracts(adapter, store, AbstractsConfig(enabled=True, layers=2))
    assert abstracts.read(key) is not None
    good = ChunkAbstract.from_kv(store.get(key).kv[:2], 1).to_chunk(str(adapter.fingerprint))
    store.put_blob(abstract_key(key), encode_entry(good, get_codec("quant"), None, abstract_key(key)))
    assert ChunkAbstracts(adapter, store, AbstractsConfig(enabled=True, layers=2)).read(key) is None  # lossy
    foreign = ChunkAbstract.from_kv(store.get(key).kv[:2], 1).to_chunk("another-model")
    store.put_blob(abstract_key(key), encode_entry(foreign, get_codec("raw"), None, abstract_key(key)))
    assert ChunkAbstracts(adapter, store, AbstractsConfig(enabled=True, layers=2)).read(key) is None
    deeper = ChunkAbstracts(adapter, store, AbstractsConfig(enabled=True, layers=3))
    store.delete(abstract_key(key))
    assert deeper.read(key) is None and deeper.summary()["missing"] == 1


def test_left_out_chunks_are_never_fetched_and_the_rest_is_as_if_only_they_were_retrieved(
        adapter: ModelAdapter, make_words: Any) -> None:
    store = TieredStore("host:256MB")
    engine = _engine(adapter, store, LEAVE_OUT_ALL_BUT_ONE)
    docs = _docs(make_words)
    engine.warm(docs)
    request = PrepareRequest(query=make_words(2, 4), chunks=docs)
    hits = store.stats()["hits"]
    prepared = engine.prepare(request, "reuse")
    skipped = [c for c in prepared.chunks if c.source == "skipped"]
    kept = [c for c in prepared.chunks if c.source != "skipped"]
    assert [c.index for c in prepared.chunks] == [0, 1, 2, 3]
    assert len(kept) == 1 and len(skipped) == 3 and kept[0].hit
    assert all(c.position == -1 and not c.hit and c.abstract_gap < 0 for c in skipped)
    assert kept[0].abstract_gap >= max(c.abstract_gap for c in skipped)
    assert store.stats()["hits"] - hits == 1  # only the kept chunk was read
    assert "abstracts" in prepared.timings and engine.abstracts.summary()["chunks_skipped"] == 3
    plain = ContextEngine(adapter, store).prepare(
        PrepareRequest(query=make_words(2, 4), chunks=[docs[kept[0].index]]), "reuse")
    assert prepared.input_ids == plain.input_ids
    torch.testing.assert_close(prepared.logits, plain.logits)


@pytest.mark.parametrize("strategy", ["blend", "auto", "compress"])
def test_every_strategy_over_cached_chunks_reports_left_out_chunks_in_order(adapter: ModelAdapter, make_words: Any,
                                                                            strategy: str) -> None:
    engine = _engine(adapter, TieredStore("host:256MB"), LEAVE_OUT_ALL_BUT_ONE)
    docs = _docs(make_words)
    engine.warm(docs)
    prepared = engine.prepare(PrepareRequest(query=make_words(2, 4), chunks=docs), strategy)
    assert [c.index for c in prepared.chunks] == [0, 1, 2, 3]
    assert sum(c.source == "skipped" for c in prepared.chunks) == 3


def test_a_high_threshold_keeps_every_chunk(adapter: ModelAdapter, make_words: Any) -> None:
    engine = _engine(adapter, TieredStore("host:256MB"),
                     AbstractsConfig(enabled=True, layers=2, threshold=1e6, min_chunks=3))
    docs = _docs(make_words)
    engine.warm(docs)
    prepared = engine.prepare(PrepareRequest(query=make_words(2, 4), chunks=docs), "blend")
    assert all(c.source == "store" and c.abstract_gap is not None for c in prepared.chunks)


def test_too_few_chunks_or_one_without_an_abstract_is_not_scored(adapter: ModelAdapter, make_words: Any) -> None:
    store = TieredStore("host:256MB")
    docs = _docs(make_words)
    engine = _engine(adapter, store, LEAVE_OUT_ALL_BUT_ONE)
    keys = engine.warm(docs).keys
    few = engine.prepare(PrepareRequest(query=make_words(2, 4), chunks=docs[:2]), "reuse")
    assert all(c.source == "store" and c.abstract_gap is None for c in few.chunks)
    assert "abstracts" not in few.timings
    store.delete(abstract_key(keys[1]))
    engine.abstracts.forget([keys[1]])
    unscored = engine.prepare(PrepareRequest(query=make_words(2, 4), chunks=docs), "reuse")
    assert all(c.source == "store" and c.abstract_gap is None for c in unscored.chunks)


def test_exempt_chunks_are_never_left_out(adapter: ModelAdapter, make_words: Any) -> None:
    engine = _engine(adapter, TieredStore("host:256MB"), LEAVE_OUT_ALL_BUT_ONE)
    docs = _docs(make_words)
    engine.warm(docs)
    request = PrepareRequest(query=make_words(2, 4), chunks=docs)
    prompt = engine.assemble(request)
    prefix_kv, _ = engine.prefix_kv(prompt, "default")
    choice = engine.abstracts.choose(prompt, prefix_kv)
    assert choice is not None and len(choice.skipped) == 3
    again = engine.abstracts.choose(prompt, prefix_kv, exempt=choice.skipped[:1])
    assert again is not None and set(again.skipped) == set(choice.skipped[1:])


def test_the_near_duplicate_index_ignores_abstract_entries(adapter: ModelAdapter, make_words: Any) -> None:
    store = TieredStore("host:256MB")
    engine = _engine(adapter, store, AbstractsConfig(enabled=True, layers=2),
                     near_duplicates=NearDuplicateConfig(enabled=True))
    engine.warm(_docs(make_words, 2), namespace="alice")
    assert len(list(store.keys("alice"))) == 4
    fresh = _engine(adapter, store, AbstractsConfig(), near_duplicates=NearDuplicateConfig(enabled=True))
    assert fresh.near_duplicates.index_store(["alice"]) == 2


def test_a_prefill_of_the_first_layers_equals_those_layers_of_a_whole_one(adapter: ModelAdapter) -> None:
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    whole = adapter.prefill(ids).kv
    torch.testing.assert_close(adapter.prefill(ids, layers=2).kv, whole[:2])
    with pytest.raises(ValueError):
        adapter.prefill(ids, layers=0)
