"""Generation from a prepared context: greedy equals the model's own generate, sampling, stops, streaming."""
from __future__ import annotations

import pytest
import torch

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.compress import CompressConfig
from ragkv.middleware.generation import GenerationConfig, generate, stream


def _hf_greedy(model, input_ids, n):
    ids = torch.tensor([input_ids])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=3)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("strategy", ["full", "prefix", "reuse"])
def test_greedy_matches_model_generate(strategy, host_engine, make_words):
    from ragkv.middleware.context import PrepareRequest

    request = PrepareRequest(query=make_words(5, 4), chunks=[make_words(60, 10)])  # reuse is exact here
    prompt = host_engine.assemble(request).input_ids
    expected = _hf_greedy(host_engine.adapter.model, prompt, 8)
    for _ in range(2):  # the second time from the stores (and the prefix cache): stored entries stay intact
        result = host_engine.generate(request, GenerationConfig(max_new_tokens=8, stop_token_ids=()),
                                      strategy=strategy)
        assert result.token_ids == expected
    assert result.finish_reason == "length" and result.strategy == strategy
    assert result.text == host_engine.adapter.decode(result.token_ids)
    assert 0 < result.prepare_s <= result.ttft_s <= result.total_s
    assert len(result.chunks) == 1


def test_streaming_callback_and_iterator(host_engine, rag_request):
    config = GenerationConfig(max_new_tokens=6, do_sample=True, seed=7, stop_token_ids=())
    events = []
    result = host_engine.generate(rag_request, config, strategy="blend", on_token=events.append)
    assert "".join(e.text for e in events) == result.text
    assert [e.token_id for e in events if e.token_id >= 0] == result.token_ids
    pieces = list(host_engine.stream(rag_request, config, strategy="blend"))
    assert "".join(pieces) == result.text  # same seed, same cache contents: same tokens


def test_sampling_is_seeded(host_engine, rag_request):
    host_engine.warm(rag_request.chunks)
    texts = []
    for seed in (1, 1, 2):
        config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=40.0, top_k=50, top_p=0.95,
                                  seed=seed, stop_token_ids=())
        texts.append(host_engine.generate(rag_request, config, strategy="reuse").token_ids)
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_stop_strings_and_stop_tokens(host_engine, rag_request):
    free = host_engine.generate(rag_request, GenerationConfig(max_new_tokens=8, do_sample=True, seed=3,
                                                              stop_token_ids=()), strategy="full")
    words = free.text.split()
    stop = words[2]
    config = GenerationConfig(max_new_tokens=8, do_sample=True, seed=3, stop_token_ids=(), stop_strings=(stop,))
    pieces = list(host_engine.stream(rag_request, config, strategy="full"))
    stopped = host_engine.generate(rag_request, config, strategy="full")
    assert stopped.finish_reason == "stop_string"
    assert stopped.text == free.text[:free.text.find(stop)]
    assert "".join(pieces) == stopped.text and all(stop not in p for p in pieces)
    first = free.token_ids[0]
    by_token = host_engine.generate(rag_request, GenerationConfig(max_new_tokens=8, do_sample=True, seed=3,
                                                                  stop_token_ids=(first,)), strategy="full")
    assert by_token.finish_reason == "stop_token" and by_token.token_ids == [] and by_token.text == ""


def test_generation_from_a_compressed_cache_keeps_positions(host_engine, rag_request):
    strategy = host_engine.strategy("compress", CompressConfig(keep_ratio=1.0))
    kept_all = host_engine.generate(rag_request, GenerationConfig(max_new_tokens=5, stop_token_ids=()),
                                    strategy=strategy)
    reused = host_engine.generate(rag_request, GenerationConfig(max_new_tokens=5, stop_token_ids=()),
                                  strategy="reuse")
    assert kept_all.token_ids == reused.token_ids
    pruned = host_engine.prepare(rag_request, host_engine.strategy("compress", CompressConfig(keep_ratio=0.3)))
    result = generate(host_engine.adapter, pruned, GenerationConfig(max_new_tokens=4, stop_token_ids=()))
    assert len(result.token_ids) == 4
    assert pruned.cache_length == len(pruned.input_ids) - 35 + round(0.3 * 35) + 3  # +3 decoded tokens' K/V


def test_generation_stops_at_the_sliding_window(word_tokenizer, model_factory, make_words):
    from ragkv.kvstore.tiers import HostConfig, HostTier
    from ragkv.middleware.adapter import ModelAdapter
    from ragkv.middleware.context import PrepareRequest
    from ragkv.middleware.engine import ContextEngine

    adapter = ModelAdapter(model_factory("mistral", sliding_window=20), word_tokenizer)
    engine = ContextEngine(adapter, HostTier(HostConfig()))
    prepared = engine.prepare(PrepareRequest(query=make_words(1, 6), chunks=[make_words(9, 10)]), "reuse")
    result = list(stream(adapter, prepared, GenerationConfig(max_new_tokens=10, stop_token_ids=())))
    assert 1 <= len(result) <= 20 - 17 + 1


def test_generation_config_is_validated():
    with pytest.raises(ConfigError, match="temperature"):
        GenerationConfig(temperature=0)
    with pytest.raises(ConfigError, match="stop_strings"):
        GenerationConfig(stop_strings="x")  # type: ignore[arg-type]


def test_tiny_sampling_temperatures_are_refused_clearly() -> None:
    from ragkv.kvstore.errors import ConfigError
    from ragkv.middleware.generation import GenerationConfig

    with pytest.raises(ConfigError, match="do_sample=False"):
        GenerationConfig(do_sample=True, temperature=1e-300)
    assert GenerationConfig(do_sample=False, temperature=1e-300).temperature == 1e-300  # ignored when greedy
    assert GenerationConfig(do_sample=True, temperature=1e-3).temperature == 1e-3
