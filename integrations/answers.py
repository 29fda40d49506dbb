"""What the doors hand the runtime and get back: documents, generation options, answer requests and answers.

Kept apart from ``RagRuntime`` so the REST models, the CLI and the framework adapters can build and read
these without the model code.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragkv.kvstore import SHARED_NAMESPACE, RagKVError
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.errors import Overloaded
from ragkv.middleware.prompt_template import ChatTurn


class Forbidden(RagKVError):
    """The caller may not touch that namespace (HTTP 403)."""


class QuotaExceeded(RagKVError):
    """A write would put a tenant over its byte or pinned-byte quota (HTTP 413)."""


class NotFound(RagKVError):
    """A referenced chunk key is not in the store (HTTP 404)."""


@dataclass(frozen=True)
class Document:
    """A document of a RAG request: its text, or the key of a chunk already in the store."""

    text: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.key is None):
            raise ConfigError("a document has exactly one of text or key")


GREEDY_BELOW_TEMPERATURE = 0.01  # the doors treat lower temperatures as greedy decoding


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding options as the doors receive them. ``temperature`` None, 0, or below 0.01 means greedy:
    sampling at such temperatures is greedy in all but name, and far below it (1e-300) the scaled logits
    overflow to inf and the sampler fails."""

    max_new_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_config(self) -> Any:
        from ragkv.middleware.generation import GenerationConfig

        sample = self.temperature is not None and self.temperature >= GREEDY_BELOW_TEMPERATURE
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=sample,
                                temperature=self.temperature if sample else 1.0,  # type: ignore[arg-type]
                                top_k=self.top_k if sample else None, top_p=self.top_p if sample else None,
                                seed=self.seed, stop_strings=tuple(self.stop))


@dataclass(frozen=True)
class AnswerRequest:
    query: str
    documents: Sequence[Document] = ()
    system: str | None = None
    history: tuple[ChatTurn, ...] = ()  # earlier chat turns, in order (the query is the last user turn)
    namespace: str = "default"  # where misses are stored
    readable_namespaces: frozenset[str] = frozenset()  # namespaces a document key may come from
    lookup_namespaces: tuple[str, ...] = ()  # where chunks are looked up, in order (empty: ``namespace``)
    store_budget_bytes: int | None = None  # misses are stored only if they fit (a quota's room); None: always
    strategy: str | None = None  # None: the engine's default (blend)
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    generation: GenerationOptions = GenerationOptions()


@dataclass
class DocumentReport:
    """What the cache did for one document."""

    index: int
    key: str
    tokens: int
    hit: bool
    tier: str | None
    codec: str | None
    source: str
    recomputed_tokens: int = 0
    load_ms: float = 0.0
    near_duplicate_of: str | None = None  # the stored chunk a miss was repaired from
    repaired_tokens: int = 0
    abstract_gap: float | None = None  # how far its abstract's bound stayed below the best chunk's (<= 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Answer:
    text: str
    finish_reason: str
    strategy: str
    ttft_s: float
    total_s: float
    timings_ms: dict[str, float]
    documents: list[DocumentReport]
    prompt_tokens: int
    completion_tokens: int

    @property
    def all_hit(self) -> bool:
        return bool(self.documents) and all(d.hit for d in self.documents)

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "finish_reason": self.finish_reason, "strategy": self.strategy,
                "ttft_ms": self.ttft_s * 1e3, "total_ms": self.total_s * 1e3, "timings_ms": dict(self.timings_ms),
                "documents": [d.to_dict() for d in self.documents],
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}}


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check; running it only needs the model."""

    prepare: Any  # ragkv.middleware.context.PrepareRequest (token ids throughout)
    strategy: Any
    generation: Any  # ragkv.middleware.generation.GenerationConfig
    custom_strategy: bool


class Cancelled(Exception):
    """Raised from a token callback to stop generating (the client went away)."""


TokenCallback = Callable[[str], None]


def answer_from(result: Any, prepared: Any, prompt_tokens: int) -> Answer:
    timings = {k: float(v) * 1e3 for k, v in prepared.timings.items()}
    timings["queue"] = result.queue_s * 1e3
    timings["prepare"] = result.prepare_s * 1e3
    timings["first_token"] = max(result.ttft_s - result.prepare_s, 0.0) * 1e3
    timings["ttft"] = result.ttft_s * 1e3
    timings["total"] = result.total_s * 1e3
    reports = [DocumentReport(index=c.index, key=c.key, tokens=c.num_tokens, hit=bool(c.hit), tier=c.tier,
                              codec=c.codec, source=c.source, recomputed_tokens=int(c.recomputed_tokens),
                              near_duplicate_of=c.near_duplicate_of, repaired_tokens=int(c.repaired_tokens),
                              abstract_gap=c.abstract_gap,
                              load_ms=float(c.load_seconds) * 1e3) for c in prepared.chunks]
    return Answer(text=result.text, finish_reason=result.finish_reason, strategy=result.strategy,
                  ttft_s=result.ttft_s, total_s=result.total_s, timings_ms=timings, documents=reports,
                  prompt_tokens=prompt_tokens, completion_tokens=len(result.token_ids))


def readable_namespaces(namespace: str) -> frozenset[str]:
    """A tenant reads its own namespace and the shared one."""
    return frozenset({namespace, SHARED_NAMESPACE})


__all__ = [
    "Answer",
    "AnswerRequest",
    "Cancelled",
    "CheckedRequest",
    "Document",
    "DocumentReport",
    "Forbidden",
    "GenerationOptions",
    "NotFound",
    "Overloaded",
    "QuotaExceeded",
    "TokenCallback",
    "answer_from",
    "readable_namespaces",
]
