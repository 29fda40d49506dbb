"""Calibration sets for ``ragkv calibrate``: the bundled sample's questions, or the user's own chunks with
generic questions (agreement with full prefill needs no gold answers, so any question about the documents
serves)."""
from __future__ import annotations

from collections.abc import Sequence

from ragkv.integrations.sample_corpus import sample_for_model
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.context import PrepareRequest

GENERIC_QUESTIONS = (
    "What are the documents above about?",
    "Name one fact that the documents state.",
    "Summarize the documents in one sentence.",
    "Which names appear in the documents?",
)
DOCUMENTS_PER_PROMPT = 4


def sample_requests(model: str | None, prompts: int) -> list[PrepareRequest]:
    """The first ``prompts`` questions of the sample the model can answer (``sample_for_model``)."""
    questions = sample_for_model(model).questions[:prompts]
    return [PrepareRequest(query=q.question, chunks=list(q.chunks)) for q in questions]


def codec_texts(model: str | None, corpus: Sequence[str] | None, limit: int) -> list[str]:
    """What the transform basis is fitted on: the first ``limit`` of the user's chunks, else of the sample's
    documents."""
    if limit < 1:
        raise ConfigError(f"the codec calibration needs at least one document, got {limit}")
    texts = list(corpus) if corpus is not None else sample_for_model(model).documents()
    if not texts:
        raise ConfigError("the calibration corpus has no chunks")
    return texts[:limit]


def corpus_requests(chunks: Sequence[str], prompts: int,
                    documents_per_prompt: int = DOCUMENTS_PER_PROMPT) -> list[PrepareRequest]:
    """``prompts`` prompts over the user's chunks: consecutive groups of ``documents_per_prompt``, each with
    one of the generic questions in turn."""
    if not chunks:
        raise ConfigError("the calibration corpus has no chunks")
    requests = []
    for i in range(prompts):
        lo = (i * documents_per_prompt) % len(chunks)
        group = [chunks[(lo + j) % len(chunks)] for j in range(min(documents_per_prompt, len(chunks)))]
        requests.append(PrepareRequest(query=GENERIC_QUESTIONS[i % len(GENERIC_QUESTIONS)], chunks=group))
    return requests


__all__ = ["DOCUMENTS_PER_PROMPT", "GENERIC_QUESTIONS", "codec_texts", "corpus_requests", "sample_requests"]
