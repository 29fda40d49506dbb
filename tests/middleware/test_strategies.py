"""Strategies: references and exactness (full, reuse, blend), store-back, prefix reuse, compress, auto."""
from __future__ import annotations

import pytest
import torch

from ragkv.kvstore.chunk import ChunkKV, ChunkMeta
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.assembly import CHUNK
from ragkv.middleware.blend import BlendConfig
from ragkv.middleware.compress import CompressConfig
from ragkv.middleware.context import PrepareRequest
from ragkv.middleware.controller import AutoConfig
from ragkv.middleware.prefix_cache import PrefixCacheConfig
from ragkv.middleware.strategies import strategy_names

ATOL = 1e-4


def _kv(prepared):
    return torch.stack([torch.stack((l.keys, l.values)) for l in prepared.cache.layers])  # [L, 2, 1, H, N, D]


def test_registry_names_every_strategy(host_engine):
    assert strategy_names() == ["auto", "blend", "compress", "full", "prefix", "reuse"]
    with pytest.raises(ConfigError, match="allowed"):
        host_engine.strategy("nope")


def test_full_equals_model_forward(host_engine, rag_request):
    full = host_engine.prepare(rag_request, "full")
    ids = torch.tensor([full.input_ids])
    with torch.no_grad():
        ref = host_engine.adapter.model(input_ids=ids).logits[0, -1]
    assert (full.logits - ref).abs().max() <= ATOL
    assert full.input_ids[0] == host_engine.adapter.start_token_id
    assert full.cache_length == len(full.input_ids) == full.next_position


def test_blend_ratio_one_equals_full(host_engine, rag_request):
    full = host_engine.prepare(rag_request, "full")
    blend = host_engine.prepare(rag_request, host_engine.strategy("blend", BlendConfig(ratio=1.0)))
    assert (blend.logits - full.logits).abs().max() <= ATOL
    assert torch.allclose(_kv(blend), _kv(full), atol=ATOL)
    assert all(c.recomputed_tokens == c.num_tokens for c in blend.chunks)


@pytest.mark.parametrize("strategy", ["reuse", "blend"])
def test_single_chunk_first_in_prompt_equals_full(strategy, host_engine, make_words):
    """A chunk right after the start token was cached in exactly its prompt context: reuse is exact, and
    blend at any ratio is exact too (its selected rows use the exact causal mask)."""
    request = PrepareRequest(query=make_words(3, 6), chunks=[make_words(40, 15)])
    full = host_engine.prepare(request, "full")
    for _ in range(2):  # a miss (computed, stored, used), then a hit
        prepared = host_engine.prepare(request, strategy)
        assert (prepared.logits - full.logits).abs().max() <= ATOL
        assert torch.allclose(_kv(prepared), _kv(full), atol=ATOL)
    assert prepared.chunks[0].hit and prepared.chunks[0].tier == "host"


def test_misses_are_computed_stored_and_hit_next_time(host_engine, rag_request):
    first = host_engine.prepare(rag_request, "reuse")
    assert [c.hit for c in first.chunks] == [False] * 3
    assert all(c.source == "computed" and c.stored for c in first.chunks)
    assert all(host_engine.store.contains(c.key) for c in first.chunks)
    second = host_engine.prepare(rag_request, "blend")
    assert [c.hit for c in second.chunks] == [True] * 3
    assert {(c.tier, c.codec) for c in second.chunks} == {("host", "decoded")}
    assert second.prefix_hit  # the start token + system prefix came from the prefix cache
    third = host_engine.prepare(rag_request, "reuse")
    assert (third.logits - first.logits).abs().max() <= ATOL  # misses were used exactly as hits are


def test_no_store_back_when_asked(host_engine, make_words):
    request = PrepareRequest(query=make_words(1, 3), chunks=[make_words(2, 5)], store_misses=False)
    prepared = host_engine.prepare(request, "reuse")
    assert not prepared.chunks[0].stored and not host_engine.store.contains(prepared.chunks[0].key)


def test_chunk_with_wrong_fingerprint_is_a_miss(host_engine, make_words):
    request = PrepareRequest(query=make_words(1, 3), chunks=[make_words(2, 5)])
    prompt = host_engine.assemble(request)
    seg = prompt.chunks[0]
    real = host_engine.cacher.compute([list(seg.token_ids)])[0]
    fake = ChunkKV(torch.zeros_like(real.kv), ChunkMeta("someone-else", seg.token_ids, 1, "float32", True))
    host_engine.store.put(seg.key, fake)
    prepared = host_engine.prepare(request, "reuse")
    assert not prepared.chunks[0].hit and prepared.chunks[0].source == "computed"


def test_blend_gradual_filtering_and_selectors(host_engine, rag_request):
    host_engine.warm(rag_request.chunks)
    n_chunk_tokens = 12 + 9 + 14
    blend = host_engine.prepare(rag_request, host_engine.strategy("blend", BlendConfig(ratio=0.2, check_layers=(1, 2))))
    assert blend.details["checks"] == [(1, round(0.4 * n_chunk_tokens)), (2, round(0.2 * n_chunk_tokens))]
    rows = blend.details["rows_per_layer"]
    query = 5
    assert rows[0] == rows[1] == n_chunk_tokens + query and rows[2] == 14 + query and rows[3] == 7 + query
    assert set(blend.details["selections"][2]) <= set(blend.details["selections"][1])  # narrowing
    assert sum(c.recomputed_tokens for c in blend.chunks) == 7
    rand = host_engine.prepare(rag_request, host_engine.strategy(
        "blend", BlendConfig(ratio=0.2, selector="random", seed=3)))
    assert rand.details["selector"] == "random"
    assert rand.details["selections"][2] != blend.details["selections"][2]
    value = host_engine.prepare(rag_request, host_engine.strategy(
        "blend", BlendConfig(ratio=0.2, deviation="value", check_layers=(2,))))
    assert value.details["checks"] == [(2, 7)]


def test_blend_selects_rows_that_deviate(host_engine, rag_request):
    """The deviation rule picks rows whose cached K differs from the fresh K: planting a corruption in
    one stored chunk makes exactly its rows the selected ones."""
    host_engine.warm(rag_request.chunks)
    prompt = host_engine.assemble(rag_request)
    seg = prompt.chunks[1]
    chunk = host_engine.store.get(seg.key)
    broken = chunk.kv.clone()
    broken[:, 0, :, 2:5] += 50.0  # keys of tokens 2..4, every layer
    host_engine.store.put(seg.key, ChunkKV(broken, chunk.meta))
    blend = host_engine.prepare(rag_request, host_engine.strategy("blend", BlendConfig(ratio=3 / 35,
                                                                                       check_layers=(1,))))
    assert blend.details["selections"][1] == [seg.start + 2, seg.start + 3, seg.start + 4]


def test_prefix_strategy_repeat_and_shared_system_prefix(host_engine, rag_request, make_words):
    full = host_engine.prepare(rag_request, "full")
    first = host_engine.prepare(rag_request, "prefix")
    assert first.details["matched_tokens"] == 0 and not first.prefix_hit
    again = host_engine.prepare(rag_request, "prefix")
    assert again.details["matched_tokens"] == len(full.input_ids) and all(c.tier == "prefix" for c in again.chunks)
    assert (again.logits - full.logits).abs().max() <= ATOL and again.timings["compute"] < first.timings["compute"]
    other = PrepareRequest(query=make_words(77, 4), chunks=rag_request.chunks[:1], system=rag_request.system)
    shared = host_engine.prepare(other, "prefix")
    assert shared.prefix_hit and shared.details["matched_tokens"] == 1 + 4
    assert (shared.logits - host_engine.prepare(other, "full").logits).abs().max() <= ATOL


def test_prefix_entries_are_bounded(word_tokenizer, make_words, model_factory):
    from ragkv.kvstore.tiers import HostConfig, HostTier
    from ragkv.middleware.adapter import ModelAdapter
    from ragkv.middleware.engine import ContextEngine, EngineConfig

    engine = ContextEngine(ModelAdapter(model_factory("llama", seed=1, layers=2), word_tokenizer),
                           HostTier(HostConfig()), EngineConfig(prefix_cache=PrefixCacheConfig(max_entries=3)))
    for i in range(8):
        engine.prepare(PrepareRequest(query=make_words(i, 3), chunks=[make_words(100, 5)], system="w1 w2"), "prefix")
    assert len(engine.prefix_cache) == 3 and engine.prefix_cache.evictions >= 6
    assert len(list(engine.store.keys())) == 0  # whole prompts never go to the chunk store


def test_compress_tokens(host_engine, rag_request):
    reuse = host_engine.prepare(rag_request, "reuse")
    keep_all = host_engine.prepare(rag_request, host_engine.strategy("compress", CompressConfig(keep_ratio=1.0)))
    assert (keep_all.logits - reuse.logits).abs().max() <= ATOL
    half = host_engine.prepare(rag_request, host_engine.strategy("compress", CompressConfig(keep_ratio=0.5)))
    n = len(half.input_ids)
    assert half.cache_length == n - 35 + round(0.5 * 35) and half.next_position == n
    assert sum(c.kept_tokens for c in half.chunks) == round(0.5 * 35)
    again = host_engine.prepare(rag_request, host_engine.strategy(
        "compress", CompressConfig(keep_ratio=0.5, recompute_query=True)))
    assert again.cache_length == half.cache_length and not torch.allclose(again.logits, half.logits)


def test_compress_chunks_by_attention_and_by_retriever(host_engine, rag_request):
    by_attention = host_engine.prepare(rag_request, host_engine.strategy(
        "compress", CompressConfig(mode="chunks", keep_chunks=1, other_keep_ratio=0.25)))
    kept = sorted(c.kept_tokens for c in by_attention.chunks)
    assert max(kept) in (12, 9, 14) and len([k for k in kept if k in (3, 2, 4)]) == 2
    scored = PrepareRequest(query=rag_request.query, chunks=rag_request.chunks, system=rag_request.system,
                            chunk_scores=[0.2, 0.9, 0.5])
    dropped = host_engine.prepare(scored, host_engine.strategy(
        "compress", CompressConfig(mode="chunks", chunk_score="retriever", keep_chunks=2)))
    assert [c.source for c in dropped.chunks] == ["dropped", "store", "store"]
    assert dropped.cache_length == len(dropped.input_ids) == 1 + 4 + 9 + 14 + 5
    with pytest.raises(ConfigError, match="chunk_scores"):
        host_engine.prepare(rag_request, host_engine.strategy(
            "compress", CompressConfig(mode="chunks", chunk_score="retriever")))


def test_auto_uses_min_ratio_on_fast_tier_and_recomputes_when_loading_is_slow(host_engine, rag_request):
    host_engine.warm(rag_request.chunks)
    host_engine.costs.seconds_per_token_layer = 1e-4  # pin the measured speeds: the machine is shared
    host_engine.costs.load_bytes_per_s["host"] = 1e10
    host_engine.costs.alpha = 0.0  # and keep them pinned while this test observes more
    auto = host_engine.prepare(rag_request, "auto")
    plan = auto.details["plan"]
    assert auto.strategy == "auto" and plan["ratio"] == 0.15
    assert all(not c["recompute"] and c["source"] == "host" for c in plan["chunks"])
    # make the host tier look hopelessly slow: every chunk is recomputed from text, which is exact
    host_engine.costs.load_bytes_per_s["host"] = 1.0
    host_engine.costs.seconds_per_token_layer = 1e-3
    slow = host_engine.prepare(rag_request, "auto")
    assert all(c.source == "text" for c in slow.chunks)
    full = host_engine.prepare(rag_request, "full")
    assert (slow.logits - full.logits).abs().max() <= ATOL


def test_auto_raises_ratio_to_hide_behind_slow_loads(host_engine, rag_request):
    host_engine.warm(rag_request.chunks)
    host_engine.costs.seconds_per_token_layer = 1e-6
    host_engine.costs.load_bytes_per_s["host"] = 3e5  # loading a chunk takes about as long as computing it
    strategy = host_engine.strategy("auto", AutoConfig(allow_recompute=False, min_ratio=0.1, max_ratio=0.6))
    plan = strategy.plan(host_engine.assemble(rag_request))
    assert 0.1 < plan.ratio <= 0.6
    assert plan.compute_seconds <= plan.load_seconds + 1e-9


def test_boundary_rule_recomputes_the_first_tokens_of_each_chunk_only(host_engine, rag_request):
    host_engine.warm(rag_request.chunks)
    full = host_engine.prepare(rag_request, "full")
    lengths = [12, 9, 14]
    query = 5
    boundary = host_engine.prepare(rag_request, host_engine.strategy(
        "blend", BlendConfig(ratio=0.0, check_layers=(), boundary_tokens=4)))
    assert boundary.details["checks"] == [] and boundary.details["boundary_tokens"] == 4
    assert boundary.details["rows_per_layer"] == [3 * 4 + query] * host_engine.adapter.num_layers  # no full width
    assert [c.recomputed_tokens for c in boundary.chunks] == [4, 4, 4]
    whole = host_engine.prepare(rag_request, host_engine.strategy(
        "blend", BlendConfig(ratio=0.0, check_layers=(), boundary_tokens=max(lengths))))
    assert (whole.logits - full.logits).abs().max() <= ATOL  # k = chunk length: every row recomputed, as full
    assert torch.allclose(_kv(whole), _kv(full), atol=ATOL)
    both = host_engine.prepare(rag_request, host_engine.strategy(
        "blend", BlendConfig(ratio=0.2, check_layers=(1, 2), boundary_tokens=2)))
    assert both.details["checks"][-1] == (2, round(0.2 * (sum(lengths) - 3 * 2)))  # the rest, selected
    with pytest.raises(ConfigError, match="check layers"):
        BlendConfig(ratio=0.15, check_layers=())


def test_query_rule_picks_the_tokens_the_query_attends_to():
    """A toy case: one key equals the query direction, scaled; it gets the attention mass, and so do its
    neighbours within the pooling window, nothing else."""
    from ragkv.middleware.query_selection import attention_mass, top_rows

    torch.manual_seed(0)
    d, n = 8, 40
    q = torch.randn(1, 2, 1, d)  # two query heads, one query row
    keys = torch.randn(1, 1, n, d) * 0.1  # one kv head serves both (GQA)
    planted = 17
    keys[0, 0, planted] = q[0].mean(dim=0)[0] * 20
    mass = attention_mass(q, keys, torch.ones(1, n, dtype=torch.bool), n_rep=2, window=1)
    assert int(mass.argmax()) == planted
    pooled = attention_mass(q, keys, torch.ones(1, n, dtype=torch.bool), n_rep=2, window=5)
    assert top_rows(pooled, torch.arange(n), 5).tolist() == [15, 16, 17, 18, 19]


def test_query_rule_end_to_end(host_engine, rag_request):
    host_engine.warm(rag_request.chunks)
    full = host_engine.prepare(rag_request, "full")
    n_chunk_tokens, query, layers = 12 + 9 + 14, 5, host_engine.adapter.num_layers
    picked = host_engine.prepare(rag_request, host_engine.strategy(
        "blend", BlendConfig(ratio=0.2, rule="query", check_layers=())))
    assert picked.details["rule"] == "query" and picked.details["checks"] == []
    assert picked.details["rows_per_layer"] == [query + round(0.2 * n_chunk_tokens)] * layers  # no full width
    assert sum(c.recomputed_tokens for c in picked.chunks) == round(0.2 * n_chunk_tokens)
    for check_layers in ((), (2,)):  # single and dual stage at budget 100%: equal full
        everything = host_engine.prepare(rag_request, host_engine.strategy(
            "blend", BlendConfig(ratio=1.0, rule="query", check_layers=check_layers)))
        assert (everything.logits - full.logits).abs().max() <= ATOL
        assert torch.allclose(_kv(everything), _kv(full), atol=ATOL)


def test_dual_stage_query_rule_narrows_at_its_check_layer(host_engine, rag_request):
    """Dual stage: the first pass keeps 2r of the cached tokens through the early layers; at the check layer
    the query's attention over their fresh keys keeps r of them, a subset of the first pass."""
    host_engine.warm(rag_request.chunks)
    n_chunk_tokens, query, layers = 12 + 9 + 14, 5, host_engine.adapter.num_layers
    dual = host_engine.prepare(rag_request, host_engine.strategy(
        "blend", BlendConfig(ratio=0.2, rule="query", check_layers=(1,))))
    first, final = round(0.4 * n_chunk_tokens), round(0.2 * n_chunk_tokens)
    assert dual.details["rows_per_layer"] == [query + first] * 2 + [query + final] * (layers - 2)
    assert dual.details["checks"] == [(1, final)]
    assert sum(c.recomputed_tokens for c in dual.chunks) == final


def test_query_rerank_scores_by_the_query_attention_over_fresh_keys(host_engine, rag_request):
    """The second stage ranks with the query's attention at the check layer: a planted key that the query
    attends to there, with its neighbours in the pooling window, ranks first."""
    from ragkv.middleware.blend import BlendStrategy

    strategy = host_engine.strategy("blend", BlendConfig(ratio=0.2, rule="query", check_layers=(1,)))
    assert isinstance(strategy, BlendStrategy)
    prompt = host_engine.assemble(rag_request)
    score = strategy._query_scorer(prompt)
    a = host_engine.adapter
    n = prompt.length
    torch.manual_seed(0)
    active = torch.arange(n)
    q = torch.randn(1, a.num_kv_heads * a.n_rep, n, a.head_dim)
    kv_layer = torch.randn(2, 1, a.num_kv_heads, n, a.head_dim) * 0.01
    planted = int(prompt.chunks[1].start) + 3
    kv_layer[0, 0, :, planted] = q[0, :, -1].reshape(a.num_kv_heads, a.n_rep, -1).mean(dim=1) * 50
    slots = prompt.rows([CHUNK])
    ranking = score(1, q, active, slots, kv_layer)
    top = slots[torch.topk(ranking, 5).indices].sort().values  # the planted key and its pooled neighbours
    assert top.tolist() == list(range(planted - 2, planted + 3))


def test_compress_keeps_or_drops_whole_words(host_engine):
    """SmolLM2-style pieces: a number written as " ", "1", "9", "4", "1" is one word; so is a name in pieces.
    Each token takes its word's best score, so a word is never split by the budget."""
    from ragkv.middleware.compress import CompressStrategy

    strategy = host_engine.strategy("compress", CompressConfig(keep_ratio=0.3))
    assert isinstance(strategy, CompressStrategy)
    pieces = [" born", " in", " ", "1", "9", "4", "1", " and", " D", "ov", "rin", "."]
    strategy._word_level = False
    ids = list(range(1000, 1000 + len(pieces)))
    strategy._texts = dict(zip(ids, pieces))

    class Prompt:
        input_ids = ids

    rows = torch.arange(len(ids))
    scores = torch.zeros(len(ids))
    scores[4] = 5.0  # one digit of the year is what the query attends to
    scores[9] = 3.0  # one piece of the name
    words = strategy._word_scores(Prompt(), rows, scores)
    assert words[2:7].tolist() == [5.0] * 5 and words[8:12].tolist() == [3.0] * 4
    assert words[[0, 1, 7]].tolist() == [0.0] * 3
    strategy._word_level = True  # a word-level tokenizer: every token its own word
    assert torch.equal(strategy._word_scores(Prompt(), rows, scores), scores)
