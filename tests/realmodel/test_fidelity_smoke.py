"""A small real-model fidelity smoke (the full figures are bench/fidelity.py's): SmolLM2 can do the task, blend
at ratio 1.0 is exact, and the default blend closes part of reuse's gap to full prefill."""
from __future__ import annotations

from typing import Any

import torch
from bench_modules import load_bench_module

from ragkv.middleware import BlendConfig, GenerationConfig, PrepareRequest

fidelity_set = load_bench_module("fidelity_set")
QUESTIONS = 10
TOKENS = 16


def _run(engine: Any, strategy: Any) -> tuple[list[str], list[list[int]], list[torch.Tensor]]:
    texts, tokens, logits = [], [], []
    for q in fidelity_set.load()[:QUESTIONS]:
        prepared = engine.prepare(PrepareRequest(query=q.question, chunks=list(q.documents)), strategy=strategy)
        logits.append(torch.log_softmax(prepared.logits.float(), -1))
        result = engine.generate(prepared, GenerationConfig(max_new_tokens=TOKENS))
        texts.append(result.text)
        tokens.append(result.token_ids)
    return texts, tokens, logits


def _kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    return sum(float((p.exp() * (p - q)).sum()) for p, q in zip(reference, other)) / len(reference)


def test_real_model_fidelity_smoke(smollm2_engine: Any) -> None:
    engine = smollm2_engine
    questions = fidelity_set.load()[:QUESTIONS]
    full_text, full_tokens, full_logits = _run(engine, "full")
    correct = sum(q.answer.lower() in t.lower() for q, t in zip(questions, full_text))
    assert correct >= QUESTIONS // 2, f"full prefill answered {correct} of {QUESTIONS}: the model cannot do the task"
    _, exact_tokens, _ = _run(engine, engine.strategy("blend", BlendConfig(ratio=1.0)))
    assert exact_tokens == full_tokens  # every chunk row recomputed: the answers of full prefill
    _, _, reuse_logits = _run(engine, "reuse")
    _, _, blend_logits = _run(engine, None)  # the engine's default: blend r=0.15
    assert _kl(full_logits, blend_logits) < _kl(full_logits, reuse_logits)
