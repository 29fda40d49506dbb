"""Stored per-token importance: scored at warm time, kept in the container (versioned, optional), and the
``stored`` selection rule that reads it."""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import replace

import pytest
import torch

from ragkv.codecs import get_codec
from ragkv.kvstore import decode_entry, encode_entry
from ragkv.kvstore.chunk import ChunkKV
from ragkv.kvstore.container import MAGIC
from ragkv.kvstore.tiers import HostConfig, HostTier
from ragkv.middleware import BlendConfig, ContextEngine, ModelAdapter
from ragkv.middleware.chunking import ChunkingConfig
from ragkv.middleware.engine import EngineConfig
from ragkv.middleware.importance import top_by_importance

ATOL = 1e-4


def _kv(prepared):
    return torch.stack([torch.stack((l.keys, l.values)) for l in prepared.cache.layers])


def _stored(engine, text):
    ids = engine.cacher.tokens(text)
    found = engine.store.get(engine.cacher.key(ids))
    assert found is not None
    return found


def test_warm_stores_each_tokens_importance(host_engine, make_words):
    text = make_words(10, 12)
    host_engine.warm([text])
    meta = _stored(host_engine, text).meta
    assert len(meta.importance) == len(meta.token_ids) and max(meta.importance) == 255
    assert all(type(x) is int and 0 <= x <= 255 for x in meta.importance)
    assert len(set(meta.importance)) > 1  # it ranks something


def test_importance_is_the_attention_received_per_observer(llama_adapter):
    """Recomputed by hand from the model's own attention probabilities over one chunk."""
    from ragkv.middleware.adapter import exact_causal_mask
    from ragkv.middleware.chunking import ChunkCacher
    from ragkv.middleware.importance import quantize

    cacher = ChunkCacher(llama_adapter, None)
    ids = [5, 9, 13, 2, 7, 11]
    got = cacher.compute([ids])[0].meta.importance
    seq = torch.tensor([[llama_adapter.start_token_id, *ids]])
    n = seq.shape[1]
    total = torch.zeros(n)
    mask = exact_causal_mask(torch.arange(n), torch.arange(n))

    def observe(layer, q, k):
        total.add_(llama_adapter.attention_probs(layer, q, k, mask).sum(dim=(0, 1, 2)))

    llama_adapter.prefill(seq, observe=observe)
    assert got == quantize(total[1:] / torch.arange(n - 1, 0, -1))


def test_importance_can_be_switched_off(word_tokenizer, model_factory, make_words):
    engine = ContextEngine(ModelAdapter(model_factory("llama", seed=1, layers=4), word_tokenizer),
                           HostTier(HostConfig()), EngineConfig(chunking=ChunkingConfig(store_importance=False)))
    text = make_words(10, 12)
    engine.warm([text])
    assert _stored(engine, text).meta.importance == ()


def _forged(header, payload):
    hdr = json.dumps(header).encode()
    body = struct.pack("<4sHHIQ", MAGIC, 1, 0, len(hdr), len(payload)) + hdr + payload
    return body + struct.pack("<I", zlib.crc32(body))


def test_container_round_trip_and_versions(host_engine, make_words):
    text = make_words(10, 12)
    host_engine.warm([text])
    chunk = _stored(host_engine, text)
    key = host_engine.cacher.key(list(chunk.meta.token_ids))
    blob = encode_entry(chunk, get_codec("raw"), key=key)
    assert decode_entry(blob, key=key)[1].meta.importance == chunk.meta.importance
    hdr_len, pay_len = struct.unpack_from("<IQ", blob, 8)
    header, payload = json.loads(blob[20:20 + hdr_len]), blob[20 + hdr_len:20 + hdr_len + pay_len]
    del header["meta"]["importance"]  # an entry written before importance existed
    assert decode_entry(_forged(header, payload), key=key)[1].meta.importance == ()
    header["meta"]["importance"] = {"version": 2, "anything": "new"}  # a newer writer's layout: read as absent
    assert decode_entry(_forged(header, payload), key=key)[1].meta.importance == ()


def test_top_by_importance_and_its_fallback():
    assert top_by_importance([3, 200, 7, 255, 1], 5, 2) == [1, 3]
    assert top_by_importance((), 5, 2) == [0, 1]  # no scores: the chunk's first tokens
    assert top_by_importance([1, 2], 2, 9) == [0, 1] and top_by_importance([1, 2], 2, 0) == []


def test_stored_rule_picks_each_chunks_top_tokens(host_engine, rag_request):
    host_engine.warm(rag_request.chunks)
    full = host_engine.prepare(rag_request, "full")
    lengths, query, layers = [12, 9, 14], 5, host_engine.adapter.num_layers
    picked = host_engine.prepare(rag_request, host_engine.strategy("blend", BlendConfig(
        ratio=0.25, rule="stored", check_layers=())))
    assert [c.recomputed_tokens for c in picked.chunks] == [round(0.25 * n) for n in lengths]
    assert picked.details["rows_per_layer"] == [query + sum(round(0.25 * n) for n in lengths)] * layers
    prompt = host_engine.assemble(rag_request)
    expect = set(prompt.rows(["query"]).tolist())
    for s in prompt.chunks:  # the rows recomputed are each chunk's top stored scores, and the query
        scores = _stored(host_engine, rag_request.chunks[s.index]).meta.importance
        expect |= {s.start + i for i in top_by_importance(scores, s.length, round(0.25 * s.length))}
    assert set(picked.details["recomputed_rows"]) == expect
    for check_layers in ((), (1,)):  # budget 100%, one and two stages: equals full
        everything = host_engine.prepare(rag_request, host_engine.strategy("blend", BlendConfig(
            ratio=1.0, rule="stored", check_layers=check_layers)))
        assert (everything.logits - full.logits).abs().max() <= ATOL
        assert torch.allclose(_kv(everything), _kv(full), atol=ATOL)


def test_two_stage_stored_rule_narrows_by_deviation(host_engine, rag_request):
    host_engine.warm(rag_request.chunks)
    lengths, query = [12, 9, 14], 5
    two = host_engine.prepare(rag_request, host_engine.strategy("blend", BlendConfig(
        ratio=0.25, rule="stored", check_layers=(1,))))
    first = sum(round(0.5 * n) for n in lengths)
    assert two.details["rows_per_layer"][:2] == [query + first] * 2
    assert two.details["checks"] == [(1, round(0.25 * sum(lengths)))]


def test_stored_rule_on_entries_without_scores_takes_their_first_tokens(host_engine, rag_request):
    """An old entry (no scores) still blends: its first tokens are chosen, where the attention sink sits."""
    for text in rag_request.chunks:
        ids = host_engine.cacher.tokens(text)
        chunk = host_engine.cacher.compute([ids])[0]
        host_engine.store.put(host_engine.cacher.key(ids), ChunkKV(chunk.kv, replace(chunk.meta, importance=())))
    picked = host_engine.prepare(rag_request, host_engine.strategy("blend", BlendConfig(
        ratio=0.25, rule="stored", check_layers=())))
    assert all(c.hit for c in picked.chunks)
    full_rows = picked.details["rows_per_layer"][0]
    assert full_rows == 5 + sum(round(0.25 * n) for n in (12, 9, 14))


@pytest.mark.parametrize("rule", ["deviation", "query", "stored", "random"])
def test_every_rule_at_budget_one_equals_full(host_engine, rag_request, rule):
    host_engine.warm(rag_request.chunks)
    full = host_engine.prepare(rag_request, "full")
    everything = host_engine.prepare(rag_request, host_engine.strategy("blend", BlendConfig(ratio=1.0, rule=rule)))
    assert (everything.logits - full.logits).abs().max() <= ATOL
    assert torch.allclose(_kv(everything), _kv(full), atol=ATOL)


def test_random_rule_is_a_seeded_control_of_the_same_size(host_engine, rag_request):
    host_engine.warm(rag_request.chunks)
    runs = [host_engine.prepare(rag_request, host_engine.strategy("blend", BlendConfig(
        ratio=0.25, rule="random", check_layers=(), seed=seed))) for seed in (1, 1, 2)]
    rows = [r.details["recomputed_rows"] for r in runs]
    assert rows[0] == rows[1] != rows[2] and len(rows[0]) == len(rows[2]) == 5 + round(0.25 * (12 + 9 + 14))
