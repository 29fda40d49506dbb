"""On SmolLM2 (float32, greedy): answers decoded together in one batch are the answers decoded one at a time."""
from __future__ import annotations

from typing import Any

from batching import alone, together

from ragkv.middleware import PrepareRequest
from ragkv.middleware.generation import GenerationConfig

DOCS = ["Brellinford is a small town on the river Asla.", "The mayor of Brellinford is Hella Strom.",
        "Asla floods every spring; the town built a dyke in 1902.", "Hella Strom was a teacher before she was mayor."]


def test_batched_answers_equal_one_at_a_time_answers(smollm2_engine: Any) -> None:
    plain = GenerationConfig(max_new_tokens=16)
    questions = [("Who is the mayor of Brellinford?", DOCS[:2], "reuse", plain),
                 ("When was the dyke built?", DOCS, "blend", plain),
                 ("What river is Brellinford on?", DOCS[:1], "full", GenerationConfig(max_new_tokens=5)),
                 ("What did Hella Strom do before?", DOCS[1:], "full",
                  GenerationConfig(max_new_tokens=16, stop_strings=("teacher",)))]
    cases = [(PrepareRequest(query=q, chunks=d), s, g) for q, d, s, g in questions]
    expected = alone(smollm2_engine, cases)
    got, scheduler = together(smollm2_engine, cases, prefills_per_step=4)
    assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in expected]
    assert expected[3].finish_reason == "stop_string" and len(expected[0].token_ids) > 3
    assert max(scheduler.batch_sizes) >= 3
