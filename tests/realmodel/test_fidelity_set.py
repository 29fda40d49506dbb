"""The planted-fact question set: kept in the repo, equal to its generator, shaped as the fidelity bench needs."""
from __future__ import annotations

from collections import Counter

from bench_modules import load_bench_module

fidelity_set = load_bench_module("fidelity_set")


def test_the_kept_set_is_the_generators_output() -> None:
    assert fidelity_set.load() == fidelity_set.generate()


def test_set_shape() -> None:
    questions = fidelity_set.load()
    assert len(questions) >= 150
    assert sum(q.kind == "two-doc" for q in questions) >= len(questions) / 3
    assert all(4 <= len(q.documents) <= 8 for q in questions)
    for q in questions:
        assert len(q.needed) == (2 if q.kind == "two-doc" else 1)
        # the answer stands in a document the question needs
        assert any(q.answer in q.documents[i] for i in q.needed)
        assert len(q.answer.split()) <= 3
    recurring = Counter(d for q in questions for d in q.documents)
    assert max(recurring.values()) >= 3  # documents recur across questions ...
    positions = {}
    for q in questions:
        for i, d in enumerate(q.documents):
            positions.setdefault(d, set()).add(i)
    assert sum(len(p) > 1 for p in positions.values()) >= len(positions) / 2  # ... in different positions
