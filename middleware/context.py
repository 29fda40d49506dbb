"""Request and result dataclasses at the middleware boundary: ``PrepareRequest -> PreparedContext``."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ragkv.kvstore.chunk import DEFAULT_NAMESPACE, check_namespace
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.prompt_template import ChatTurn


@dataclass(frozen=True)
class PrepareRequest:
    """A RAG prompt: optional system text, retrieved chunks, earlier chat turns, and the query.

    With a text ``query`` the prompt is rendered by the engine's ``PromptTemplate`` (the model's chat template,
    documents where its layout puts them; ``history`` holds the earlier turns in order). With a token-id
    ``query`` the prompt is laid out raw: start token + ``system`` ids (which may already begin with the start
    token: it is never doubled) + chunks + ``query`` ids; ``history`` must then be empty. A text chunk is
    tokenized alone (with the layout's separator); token-id chunks are taken as they are.
    ``chunk_scores`` (one per chunk, higher = more relevant, e.g. the retriever's) are used by ``compress``'s
    chunk-level mode. ``store_misses``: chunks missing from the store are computed, stored and used.
    ``namespace`` is where misses are stored; ``lookup_namespaces`` says where chunks are looked up, in order
    (empty: ``namespace`` alone). A service passes the tenant's own namespace, then ``shared``; the first
    one also keys the tenant's prefix-cache entries.
    """

    query: str | Sequence[int]
    chunks: Sequence[str | Sequence[int]] = ()
    system: str | Sequence[int] | None = None
    history: Sequence[ChatTurn] = ()
    namespace: str = DEFAULT_NAMESPACE
    chunk_scores: Sequence[float] | None = None
    store_misses: bool = True
    lookup_namespaces: Sequence[str] = ()

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        for namespace in self.lookup_namespaces:
            check_namespace(namespace)

    @property
    def lookup(self) -> tuple[str, ...]:
        return tuple(self.lookup_namespaces) or (self.namespace,)
        if isinstance(self.chunks, str):
            raise ConfigError("chunks must be a sequence of texts or token-id lists, not one string")
        if self.history and not isinstance(self.query, str):
            raise ConfigError("chat history needs a text query (token-id prompts are laid out raw)")
        if not isinstance(self.query, str) and isinstance(self.system, str):
            raise ConfigError("a token-id query takes token-id system text (or none)")
        if self.chunk_scores is not None and len(self.chunk_scores) != len(self.chunks):
            raise ConfigError(f"{len(self.chunk_scores)} chunk_scores for {len(self.chunks)} chunks")


@dataclass
class ChunkInfo:
    """What happened to one chunk of the request."""

    index: int
    key: str
    num_tokens: int
    position: int  # absolute position of its first token in the assembled prompt
    hit: bool  # served from the store (or from an exact prefix entry)
    tier: str | None = None  # tier it was read from; None when computed
    codec: str | None = None  # codec of the entry read ("decoded" for tensors held by fast tiers)
    # "store" | "computed" (miss, computed alone and stored) | "near-duplicate" (miss repaired from an edited
    # stored chunk) | "prefix" | "text" | "dropped" | "skipped" (left out by its abstract, never fetched)
    source: str = "store"
    recomputed_tokens: int = 0  # rows of this chunk recomputed in the deepest layers (blend)
    kept_tokens: int | None = None  # rows kept in the cache (compress); None = all
    load_seconds: float = 0.0
    stored: bool = False  # a miss that was written back to the store
    near_duplicate_of: str | None = None  # a miss repaired from this stored near-duplicate (source "near-duplicate")
    repaired_tokens: int = 0  # tokens of a near-duplicate computed when repairing it
    abstract_gap: float | None = None  # its abstract's bound below the best chunk's (<= 0); None when not scored

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PreparedContext:
    """A ready transformers ``DynamicCache`` of the whole prompt plus the last prompt token's logits.

    ``next_position`` is the position of the first generated token; it can exceed the cache length when
    ``compress`` pruned tokens (positions keep their gaps, as in SnapKV).
    """

    cache: Any
    logits: torch.Tensor  # [V] float32
    input_ids: list[int]
    next_position: int
    chunks: list[ChunkInfo]
    strategy: str
    prefix_hit: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def cache_length(self) -> int:
        return int(self.cache.get_seq_length())

    @property
    def hits(self) -> int:
        return sum(1 for c in self.chunks if c.hit)

    def summary(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "prompt_tokens": len(self.input_ids), "cache_tokens": self.cache_length,
                "prefix_hit": self.prefix_hit, "chunks": [c.to_dict() for c in self.chunks],
                "timings": dict(self.timings)}


__all__ = ["ChunkInfo", "PrepareRequest", "PreparedContext"]
