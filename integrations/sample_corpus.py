"""The sample corpora the service warms at start-up: real-text facts for chat models, the synthetic task for the toy.

A chat model (SmolLM2, the default) gets ``facts``: a few invented-fact documents in plain English and
questions about them (``sample_corpus/facts.jsonl``), which it answers from the documents. The toy model gets
the synthetic associative-recall questions below.

Why this corpus: it is the task the bundled model was trained on (``bench/quality_corpus.py``), so the model
that ``ragkv serve`` starts with answers its questions correctly, and a first user sees a real answer and a
real cache hit without bringing a model or data. Contexts are chunks such as ``"k12 v40 ; the k7 v3 ;"``;
a question ``"Q k12 ?"`` is answered ``"v40"``.

Where it comes from: in a source checkout the generator itself is loaded by path from ``bench/`` (it is a
folder of scripts, not a package); an installed wheel has no ``bench/``, so the same questions ship as
package data under ``sample_corpus/`` (a test keeps the two identical). The held-out seed is used, so the
questions were never trained on.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

PACKAGE_DATA_DIR = Path(__file__).resolve().parent / "sample_corpus"
QUESTIONS_FILE = "questions.jsonl"
FACTS_FILE = "facts.jsonl"
VOCABULARY_FILE = "vocabulary.json"
SAMPLE_SEED = 2  # quality_corpus.HELDOUT_SEED: never seen in training
SAMPLE_SIZE = 16
_GENERATOR_PATH = Path(__file__).resolve().parents[1] / "bench" / "quality_corpus.py"
_MODULE_NAME = "ragkv_sample_quality_corpus"


@dataclass(frozen=True)
class SampleQuestion:
    """One question over its own context: ``chunks`` are the documents, ``answer`` the expected first word."""

    chunks: tuple[str, ...]
    question: str
    answer: str
    kind: str  # synthetic: "inside" (the pair lies in one chunk) or "cross" (it straddles a boundary); facts: "single"

    def to_dict(self) -> dict[str, Any]:
        return {"chunks": list(self.chunks), "question": self.question, "answer": self.answer, "kind": self.kind}


@dataclass(frozen=True)
class SampleCorpus:
    questions: tuple[SampleQuestion, ...]
    vocabulary: tuple[str, ...]
    source: str  # "generator" (bench/quality_corpus.py), "package data" or "facts"

    def documents(self) -> list[str]:
        """Every distinct chunk, in first-seen order: what the service warms."""
        seen: dict[str, None] = {}
        for q in self.questions:
            for chunk in q.chunks:
                seen.setdefault(chunk, None)
        return list(seen)


def _generator_module() -> ModuleType | None:
    """``bench/quality_corpus.py`` when this is a source checkout, else ``None``."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    if not _GENERATOR_PATH.is_file():
        return None
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, _GENERATOR_PATH)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(module)
    except (ImportError, SyntaxError, AttributeError):
        del sys.modules[_MODULE_NAME]
        return None
    return module


def _from_generator(module: ModuleType, n: int) -> SampleCorpus:
    examples = module.generate_examples(n, SAMPLE_SEED)
    questions = tuple(SampleQuestion(tuple(e.chunks), e.question, e.answer, e.kind) for e in examples)
    return SampleCorpus(questions, tuple(module.vocabulary()), "generator")


def _from_package_data(n: int) -> SampleCorpus:
    lines = (PACKAGE_DATA_DIR / QUESTIONS_FILE).read_text(encoding="utf-8").splitlines()
    questions = []
    for line in lines[:n]:
        d = json.loads(line)
        questions.append(SampleQuestion(tuple(d["chunks"]), d["question"], d["answer"], d["kind"]))
    vocabulary = json.loads((PACKAGE_DATA_DIR / VOCABULARY_FILE).read_text(encoding="utf-8"))
    return SampleCorpus(tuple(questions), tuple(vocabulary), "package data")


def load_sample_corpus(n: int = SAMPLE_SIZE, prefer_generator: bool = True) -> SampleCorpus:
    """The first ``n`` held-out questions (at most ``SAMPLE_SIZE`` from package data)."""
    module = _generator_module() if prefer_generator else None
    return _from_generator(module, n) if module is not None else _from_package_data(n)


def load_facts_corpus() -> SampleCorpus:
    """The real-text sample for chat models: invented facts, answered from the documents."""
    questions = []
    for line in (PACKAGE_DATA_DIR / FACTS_FILE).read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        questions.append(SampleQuestion(tuple(d["chunks"]), d["question"], d["answer"], d["kind"]))
    return SampleCorpus(tuple(questions), (), "facts")


def sample_for_model(model: str | None) -> SampleCorpus:
    """The sample a model can answer: the synthetic task for ``toy``, the real-text facts for every other model."""
    return load_sample_corpus() if model == "toy" else load_facts_corpus()


def write_package_data(directory: Path = PACKAGE_DATA_DIR, n: int = SAMPLE_SIZE) -> None:
    """Regenerate the packaged copy from the generator (run from a source checkout)."""
    module = _generator_module()
    if module is None:
        raise RuntimeError(f"{_GENERATOR_PATH} is not available; run this from a source checkout")
    corpus = _from_generator(module, n)
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(q.to_dict(), sort_keys=True) + "\n" for q in corpus.questions)
    (directory / QUESTIONS_FILE).write_text(text, encoding="utf-8")
    (directory / VOCABULARY_FILE).write_text(json.dumps(list(corpus.vocabulary)) + "\n", encoding="utf-8")


def example_documents(corpus: SampleCorpus, indices: Sequence[int] = (0,)) -> list[str]:
    return [chunk for i in indices for chunk in corpus.questions[i].chunks]


if __name__ == "__main__":  # python -m ragkv.integrations.sample_corpus  (refresh the package data)
    write_package_data()
    print(f"wrote {PACKAGE_DATA_DIR}")
