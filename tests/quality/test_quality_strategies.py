"""Quality smoke test: the middleware's strategies on a few dozen held-out questions of the bundled model.

The full 400-question report is ``bench/quality.py`` (``bench/RESULTS_quality.md``). Here: full prefill
through the engine meets the bar, blend at r = 1.0 recomputes everything and so answers exactly as full
prefill, and independent-chunk reuse is no better than full on cross-boundary questions (it should lose
them: that is the gap blending exists to close).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from ragkv.middleware import BlendConfig, ContextEngine, ModelAdapter

pytest.importorskip("transformers")

from bench_modules import load_bench_module

SMOKE_QUESTIONS = 32


quality = load_bench_module("quality")
corpus = load_bench_module("quality_corpus")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ContextEngine, list[Any], torch.Tensor, list[str]]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        model, tokenizer = quality.load_model()
    examples = corpus.generate_examples(SMOKE_QUESTIONS, corpus.HELDOUT_SEED)
    engine = quality.build_engine(ModelAdapter(model, tokenizer, model_id="ragkv-bundled"), "host",
                                  tmp_path_factory.mktemp("quality"))
    engine.warm([chunk for example in examples for chunk in example.chunks])
    yield engine, examples, quality.answer_ids(tokenizer, examples), [e.kind for e in examples]
    engine.store.close()


@pytest.fixture(scope="module")
def full(setup: tuple[ContextEngine, list[Any], torch.Tensor, list[str]]) -> Any:
    engine, examples, _, _ = setup
    return quality.run_strategy(engine, examples, quality.Variant("full"))


def run(setup: tuple[ContextEngine, list[Any], torch.Tensor, list[str]], full: Any, variant: Any) -> Any:
    engine, examples, answers, kinds = setup
    outcome = quality.run_strategy(engine, examples, variant)
    return outcome, quality.score(outcome, full, answers, kinds)


def test_full_prefill_through_the_engine_meets_the_bar(setup: Any, full: Any) -> None:
    _, _, answers, kinds = setup
    assert kinds.count("inside") == kinds.count("cross") == SMOKE_QUESTIONS // 2
    scores = quality.score(full, full, answers, kinds)
    assert scores.inside >= 0.90, scores
    assert scores.cross >= 0.80, scores
    assert scores.overall >= 0.85, scores
    assert scores.agreement == 1.0 and scores.mean_kl == 0.0


def test_blend_at_ratio_one_answers_as_full_prefill(setup: Any, full: Any) -> None:
    variant = quality.blend_variant("blend 1.0", 1.0, BlendConfig().check_layers)
    outcome, scores = run(setup, full, variant)
    assert torch.equal(outcome.logits.argmax(dim=-1), full.logits.argmax(dim=-1))
    torch.testing.assert_close(outcome.logits, full.logits, rtol=1e-4, atol=1e-3)
    assert scores.agreement == 1.0
    assert scores.mean_kl < 1e-6
    assert outcome.compute_fraction > 0.95  # every row recomputed in every layer (the start token is not)


def test_reuse_is_not_better_than_full_on_cross_boundary_questions(setup: Any, full: Any) -> None:
    _, _, answers, kinds = setup
    full_scores = quality.score(full, full, answers, kinds)
    _, reuse = run(setup, full, quality.Variant("reuse", "reuse"))
    assert reuse.cross <= full_scores.cross
    assert reuse.cross <= full_scores.cross - 0.5, (reuse, full_scores)  # visibly lower: the gap blend must close
    assert reuse.inside >= 0.85, reuse  # inside-chunk answers need nothing from other chunks


def test_scores_compare_answer_distributions() -> None:
    """Agreement is argmax identity; KL(full || row) is zero for equal logits and positive otherwise."""
    full = quality.Outcome(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), 1.0, 0.0)
    other = quality.Outcome(torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]]), 0.5, 0.0)
    answers = torch.tensor([0, 1])
    same = quality.score(full, full, answers, ["inside", "cross"])
    assert (same.inside, same.cross, same.agreement, same.mean_kl) == (1.0, 1.0, 1.0, 0.0)
    differs = quality.score(other, full, answers, ["inside", "cross"])
    assert (differs.inside, differs.cross, differs.agreement) == (1.0, 0.0, 0.5)
    assert differs.mean_kl > 0.5
    assert quality.recovered(0.95, 1.0, 0.0) == pytest.approx(0.95)
    assert quality.recovered(0.5, 0.5, 0.5) is None
