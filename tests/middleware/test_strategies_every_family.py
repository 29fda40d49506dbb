"""Every strategy runs end to end (warm, prepare, generate) on every supported family, and the exact ones
are exact there too: blend at ratio 1.0 equals full prefill, reuse of a chunk cached in its own context too."""
from __future__ import annotations

import pytest
import torch

from ragkv.kvstore.tiers import HostConfig, HostTier
from ragkv.middleware import BlendConfig, ContextEngine, GenerationConfig, ModelAdapter, PrepareRequest
from ragkv.middleware.strategies import strategy_names

ATOL = 1e-4


FAMILIES = ["llama", "llama_untied_llama3rope", "qwen2", "qwen3", "mistral"]  # tests/middleware/conftest.py


def words(start: int, n: int) -> str:
    return " ".join(f"w{(start + 7 * i) % 60}" for i in range(n))


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request: pytest.FixtureRequest, word_tokenizer, model_factory) -> ContextEngine:
    torch.set_num_threads(1)
    # 5 layers: the default blend check layers (2, 3) both fall inside the model
    return ContextEngine(ModelAdapter(model_factory(request.param, seed=3, layers=5), word_tokenizer),
                         HostTier(HostConfig()))


def test_every_strategy_prepares_and_generates(engine: ContextEngine) -> None:
    request = PrepareRequest(query=words(1, 5), chunks=[words(10, 12), words(30, 9), words(50, 14)],
                             system=words(90, 4))
    engine.warm(request.chunks)
    full = engine.prepare(request, "full")
    reference = engine.generate(engine.prepare(request, "full"), GenerationConfig(max_new_tokens=3))
    assert len(reference.token_ids) == 3
    for name in strategy_names():
        prepared = engine.prepare(request, name)
        assert prepared.logits.shape == full.logits.shape and torch.isfinite(prepared.logits).all(), name
        if name != "full":
            assert all(c.hit for c in prepared.chunks if c.source == "store"), name
        result = engine.generate(prepared, GenerationConfig(max_new_tokens=3))
        assert len(result.token_ids) == 3 and result.ttft_s > 0, name
        if name in ("full", "prefix"):
            assert result.token_ids == reference.token_ids, name
    blend_all = engine.prepare(request, engine.strategy("blend", BlendConfig(ratio=1.0)))
    assert (blend_all.logits - full.logits).abs().max() <= ATOL


def test_reuse_of_a_chunk_in_its_own_context_is_exact(engine: ContextEngine) -> None:
    request = PrepareRequest(query=words(3, 6), chunks=[words(40, 15)])
    full = engine.prepare(request, "full")
    engine.warm(request.chunks)
    reuse = engine.prepare(request, "reuse")
    assert reuse.chunks[0].hit
    assert (reuse.logits - full.logits).abs().max() <= ATOL


@pytest.mark.parametrize("config", [
    BlendConfig(ratio=1.0, rule="query", check_layers=()), BlendConfig(ratio=1.0, rule="query", check_layers=(2,)),
    BlendConfig(ratio=1.0, rule="stored", check_layers=()), BlendConfig(ratio=1.0, rule="stored"),
    BlendConfig(ratio=0.0, check_layers=(), boundary_tokens=14)], ids=lambda c: f"{c.rule}-{c.check_layers}")
def test_every_selection_rule_at_full_budget_equals_full(engine: ContextEngine, config: BlendConfig) -> None:
    """Query (one and two stages), stored (one and two stages) at budget 100%, boundary with k = the longest
    chunk: each recomputes every row, so each equals full prefill on every family."""
    request = PrepareRequest(query=words(1, 5), chunks=[words(10, 12), words(30, 9), words(50, 14)])
    engine.warm(request.chunks)
    full = engine.prepare(request, "full")
    blended = engine.prepare(request, engine.strategy("blend", config))
    assert (blended.logits - full.logits).abs().max() <= ATOL


def test_calibration_and_quality_aware_auto_on_every_family(engine: ContextEngine) -> None:
    """A calibration round on each family: the exact candidate agrees everywhere and is chosen at target 1.0;
    auto then plans with it and equals full prefill."""
    from ragkv.middleware.calibration import calibrate

    request = PrepareRequest(query=words(2, 5), chunks=[words(11, 12), words(31, 9)])
    exact = ("stored 1.0", BlendConfig(ratio=1.0, rule="stored", check_layers=()))
    cheap = ("boundary k=1", BlendConfig(ratio=0.0, check_layers=(), boundary_tokens=1))
    calibration = calibrate(engine, [request], candidates=[cheap, exact], tokens=3, target=1.0)
    assert calibration.points[1].agreement == 1.0
    assert calibration.choice is not None
    engine.use_calibration(calibration)
    try:
        full = engine.prepare(request, "full")
        auto = engine.prepare(request, "auto")
        assert auto.details["choice"]["calibrated"] and auto.details["choice"]["name"] == calibration.choice.name
        if calibration.choice.name == "stored 1.0":
            assert (auto.logits - full.logits).abs().max() <= ATOL
    finally:
        engine.use_calibration(None)
