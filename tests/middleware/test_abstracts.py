"""Chunk abstracts: the score bound is never below the true maximum, wherever the chunk is placed."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from ragkv.kvstore.chunk import ChunkKV
from ragkv.kvstore.errors import ConfigError, CorruptEntry
from ragkv.middleware.abstracts import ChunkAbstract, abstract_key, is_abstract_key
from ragkv.middleware.rope import rotate_keys


def _true_max(kv: torch.Tensor, layer: int, q: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """max over the chunk's tokens of q · k, keys moved ``delta`` positions later; [Hq, R]."""
    keys = rotate_keys(kv, delta, inv_freq)[layer, 0].to(torch.float32)  # [H, T, D]
    keys = keys.repeat_interleave(q.shape[0] // keys.shape[0], dim=0)  # [Hq, T, D]
    return (q.to(torch.float32) @ keys.transpose(1, 2)).amax(dim=-1)


@pytest.mark.parametrize("delta", [0, 1, 37, 500])
def test_the_bound_is_never_below_the_true_maximum(host_engine: Any, make_words: Any, delta: int) -> None:
    adapter = host_engine.adapter
    chunk = host_engine.cacher.compute([host_engine.cacher.tokens(make_words(4, 30))])[0]
    abstract = ChunkAbstract.from_kv(chunk.kv, chunk.meta.position)
    g = torch.Generator().manual_seed(delta)
    for layer in range(adapter.num_layers):
        q = torch.randn(adapter.num_heads, 5, adapter.head_dim, generator=g) * 3
        bound = abstract.bound(layer, q, chunk.meta.position + delta, adapter.inv_freq)
        truth = _true_max(chunk.kv, layer, q, delta, adapter.inv_freq)
        assert bound.shape == truth.shape == (adapter.num_heads, 5)
        assert bool((bound >= truth - 1e-3 * (1 + truth.abs())).all())


def test_a_one_token_chunk_is_bounded_exactly(host_engine: Any, make_words: Any) -> None:
    adapter = host_engine.adapter
    chunk = host_engine.cacher.compute([host_engine.cacher.tokens(make_words(9, 1))])[0]
    abstract = ChunkAbstract.from_kv(chunk.kv, 1)
    q = torch.randn(adapter.num_heads, 3, adapter.head_dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(abstract.bound(2, q, 41, adapter.inv_freq),
                               _true_max(chunk.kv, 2, q, 40, adapter.inv_freq), rtol=1e-4, atol=1e-4)


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="kv must be"):
        ChunkAbstract.from_kv(torch.zeros(2, 2, 1, 0, 4), 1)
    abstract = ChunkAbstract.from_kv(torch.zeros(2, 2, 2, 3, 4), 1)
    with pytest.raises(ValueError, match="q must be"):
        abstract.bound(0, torch.zeros(3, 1, 4), 1, torch.ones(2))  # 3 query heads over 2 KV heads


def test_the_mass_bound_is_never_below_the_true_log_mass(host_engine: Any, make_words: Any) -> None:
    adapter = host_engine.adapter
    chunk = host_engine.cacher.compute([host_engine.cacher.tokens(make_words(6, 25))])[0]
    abstract = ChunkAbstract.from_kv(chunk.kv, chunk.meta.position)
    q = torch.randn(adapter.num_heads, 4, adapter.head_dim, generator=torch.Generator().manual_seed(3)) * 2
    for layer in range(adapter.num_layers):
        keys = rotate_keys(chunk.kv, 9, adapter.inv_freq)[layer, 0].repeat_interleave(
            adapter.num_heads // adapter.num_kv_heads, dim=0)
        truth = torch.logsumexp(0.125 * q @ keys.transpose(1, 2), dim=-1)
        bound = abstract.log_mass_bound(layer, q, chunk.meta.position + 9, adapter.inv_freq, 0.125)
        assert bool((bound >= truth - 1e-3).all())


def test_the_stored_form_round_trips_and_hostile_ones_are_refused(host_engine: Any, make_words: Any) -> None:
    chunk = host_engine.cacher.compute([host_engine.cacher.tokens(make_words(2, 12))])[0]
    abstract = ChunkAbstract.from_kv(chunk.kv, chunk.meta.position)
    stored = abstract.to_chunk("fp")
    again = ChunkAbstract.from_chunk(stored)
    assert torch.equal(again.kmin, abstract.kmin) and torch.equal(again.kmax, abstract.kmax)
    assert (again.position, again.num_tokens) == (abstract.position, 12)
    flipped = stored.kv.clone()
    flipped[0, 0, 0, 0, 0] = flipped[0, 1, 0, 0, 0] + 1  # a minimum above its maximum
    nan = stored.kv.clone()
    nan[1, 1, 0, 0, 3] = float("nan")
    for kv, meta in ((flipped, stored.meta), (nan, stored.meta),
                     (stored.kv, replace(stored.meta, extra={**stored.meta.extra, "version": 2})),
                     (stored.kv, replace(stored.meta, extra={**stored.meta.extra, "tokens": 0})),
                     (stored.kv, replace(stored.meta, extra={})),
                     (stored.kv.half(), stored.meta)):
        with pytest.raises(CorruptEntry):
            ChunkAbstract.from_chunk(ChunkKV(kv, meta))


def test_an_abstract_key_stays_in_its_chunks_namespace() -> None:
    assert abstract_key("alice:0123abcd") == "alice:0123abcd.abstract"
    assert is_abstract_key(abstract_key("alice:0123abcd")) and not is_abstract_key("alice:0123abcd")
    with pytest.raises(ConfigError):
        abstract_key("alice:" + "a" * 125)  # no room for the suffix
