"""Chunk caching: tokens alone, keys by content, KV computed behind the start token, batched, stored."""
from __future__ import annotations

import torch

from ragkv.kvstore.tiers import HostConfig, HostTier
from ragkv.middleware.chunking import ChunkCacher, ChunkingConfig


def test_same_chunk_same_tokens_same_key(llama_adapter, make_words):
    cacher = ChunkCacher(llama_adapter, HostTier(HostConfig()))
    text = make_words(3, 9)
    assert cacher.tokens(text) == cacher.tokens(text) == cacher.tokens(list(cacher.tokens(text)))
    assert cacher.key(cacher.tokens(text)) == cacher.key(cacher.tokens(text))
    assert cacher.key(cacher.tokens(text), "a") != cacher.key(cacher.tokens(text), "b")
    assert llama_adapter.start_token_id not in cacher.tokens(text)  # no special tokens inside chunks


def test_batched_chunks_equal_single_prefill_behind_start(llama_adapter, make_words):
    cacher = ChunkCacher(llama_adapter, HostTier(HostConfig()), ChunkingConfig(batch_size=3))
    texts = [make_words(i * 5, n) for i, n in enumerate([4, 11, 7, 1, 9])]
    chunks = cacher.compute([cacher.tokens(t) for t in texts])
    for text, chunk in zip(texts, chunks):
        ids = [llama_adapter.start_token_id] + cacher.tokens(text)
        alone = llama_adapter.prefill(torch.tensor([ids])).kv[:, :, 0, :, 1:]
        assert chunk.meta.position == 1 and chunk.meta.rope and chunk.meta.dtype == "float32"
        assert chunk.meta.fingerprint == str(llama_adapter.fingerprint)
        assert chunk.meta.token_ids == tuple(ids[1:])
        assert torch.allclose(chunk.kv, alone, atol=1e-5)


def test_warm_is_one_call_and_skips_cached(llama_adapter, make_words):
    store = HostTier(HostConfig())
    cacher = ChunkCacher(llama_adapter, store)
    corpus = [make_words(i, 6 + i) for i in range(5)] + [make_words(0, 6)]  # one duplicate
    report = cacher.warm(corpus, namespace="tenant1")
    assert report.computed == 5 and report.already_cached == 1 and len(report.keys) == 6
    assert all(store.contains(k) for k in report.keys)
    assert all(k.startswith("tenant1:") for k in report.keys)
    again = cacher.warm(corpus, namespace="tenant1")
    assert again.computed == 0 and again.already_cached == 6 and again.keys == report.keys
