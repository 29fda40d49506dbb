"""``RagRuntime``: one model, one store, one ``ContextEngine``, shared by every door (REST, CLI, LangChain, LlamaIndex).

Why one object: every integration does the same three things — warm chunk texts, answer a query over
documents (texts or stored chunk keys) with a strategy, and report what the cache did — and the engine is
not thread-safe (its prefix cache, cost model and the model's own decoding state). The runtime serialises
model work behind one lock with a bounded wait list, so a burst of requests queues (or is refused with
``Overloaded``) instead of growing without bound, while store-only work (chunk get/put) never waits for it.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragkv.integrations.models import LoadedModel, ModelInfo, load_model, make_adapter
from ragkv.kvstore import (
    SHARED_NAMESPACE,
    ChunkKV,
    ModelMismatch,
    RagKVError,
    TieredStore,
    check_key,
    key_namespace,
)
from ragkv.kvstore.errors import ConfigError


class Overloaded(RagKVError):
    """Too many model requests are already waiting; retry later (HTTP 429)."""


class Forbidden(RagKVError):
    """The caller may not touch that namespace (HTTP 403)."""


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


MIN_SAMPLING_TEMPERATURE = 0.01


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

        sample = self.temperature is not None and self.temperature >= MIN_SAMPLING_TEMPERATURE
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=sample,
                                temperature=self.temperature if sample else 1.0,  # type: ignore[arg-type]
                                top_k=self.top_k if sample else None, top_p=self.top_p if sample else None,
                                seed=self.seed, stop_strings=tuple(self.stop))


@dataclass(frozen=True)
class AnswerRequest:
    query: str
    documents: Sequence[Document] = ()
    system: str | None = None
    namespace: str = "default"  # where chunks are looked up and where misses are stored
    readable_namespaces: frozenset[str] = frozenset()  # namespaces a document key may come from
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


class RagRuntime:
    """Model + store + engine behind one lock. A context manager; ``close`` closes the store it opened."""

    def __init__(self, loaded: LoadedModel, store: TieredStore, *, max_waiting: int = 16,
                 wait_timeout_s: float = 120.0, own_store: bool = False, engine_config: Any = None,
                 max_chunk_tokens: int = 4096, max_context_tokens: int | None = None) -> None:
        from ragkv.middleware.engine import ContextEngine, EngineConfig

        self.loaded = loaded
        self.info: ModelInfo = loaded.info
        self.adapter = make_adapter(loaded)
        self.store = store
        self.engine = ContextEngine(self.adapter, store, engine_config or EngineConfig())
        self.max_waiting = max_waiting
        self.wait_timeout_s = wait_timeout_s
        self._own_store = own_store
        # Budgets that keep one request's compute and memory bounded: a chunk is prefilled alone, a prompt
        # (plus its generation) is bounded by the model's trained positions unless told otherwise.
        self.max_chunk_tokens = max_chunk_tokens
        positions = getattr(self.adapter.config, "max_position_embeddings", None)
        self.max_context_tokens = max_context_tokens or int(positions or 16384)
        self._model_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._waiting = 0

    @classmethod
    def open(cls, store: str | TieredStore | None = None, model: str | None = None, *, dtype: str | None = None,
             **kwargs: Any) -> RagRuntime:
        """Open a store (spec, config file, or None for the embedded default) and load a model (None: default)."""
        loaded = load_model(model, dtype=dtype)
        if isinstance(store, TieredStore):
            return cls(loaded, store, **kwargs)
        opened = TieredStore(store)
        try:
            return cls(loaded, opened, own_store=True, **kwargs)
        except BaseException:
            opened.close()
            raise

    # -- model lock ---------------------------------------------------------------------------------------------
    def _acquire(self) -> None:
        with self._state_lock:
            if self._waiting >= self.max_waiting:
                raise Overloaded(f"{self._waiting} model requests are already waiting; retry later")
            self._waiting += 1
        try:
            if not self._model_lock.acquire(timeout=self.wait_timeout_s):
                raise Overloaded(f"the model stayed busy for {self.wait_timeout_s:.0f} s; retry later")
        finally:
            with self._state_lock:
                self._waiting -= 1

    @property
    def waiting(self) -> int:
        return self._waiting

    # -- warming -------------------------------------------------------------------------------------------------
    def chunk_tokens(self, text: str) -> list[int]:
        return self.engine.cacher.tokens(text)

    def key_for(self, text: str, namespace: str) -> str:
        """The store key a chunk text gets in ``namespace`` (content hash; no model work)."""
        return self.engine.cacher.key(self.chunk_tokens(text), namespace)

    def warm(self, texts: Sequence[str], namespace: str, *, ttl_s: float | None = None, pin: bool = False) -> Any:
        """Compute and store the KV of every text not already stored; returns the middleware's ``WarmReport``."""
        token_lists = [self.chunk_tokens(t) for t in texts]
        for i, ids in enumerate(token_lists):
            if len(ids) > self.max_chunk_tokens:
                raise ConfigError(f"text {i} has {len(ids)} tokens; the limit is {self.max_chunk_tokens}")
        self._acquire()
        try:
            return self.engine.warm(token_lists, namespace=namespace, ttl_s=ttl_s, pin=pin)
        finally:
            self._model_lock.release()

    # -- answering -----------------------------------------------------------------------------------------------
    def resolve_document(self, document: Document, readable: frozenset[str]) -> str | list[int]:
        """A text as it is; a key as its chunk's token ids (checked: readable namespace, same model)."""
        if document.text is not None:
            return document.text
        key = check_key(str(document.key))
        if key_namespace(key) not in readable:
            raise Forbidden(f"namespace {key_namespace(key)!r} is not readable with this API key")
        chunk: ChunkKV | None = self.store.get(key)
        if chunk is None:
            raise NotFound(f"chunk {key} is not in the store")
        if chunk.meta.fingerprint != str(self.adapter.fingerprint):
            raise ModelMismatch(f"chunk {key} was computed by another model than the one this server runs")
        return list(chunk.meta.token_ids)

    def strategy(self, name: str | None, params: Mapping[str, Any]) -> Any:
        """A strategy instance: the engine's shared one, or a fresh one configured from JSON-like ``params``."""
        base = self.engine.strategy(name)  # ConfigError naming the allowed names
        if not params:
            return base
        config = config_from_params(type(base.config), params)
        return self.engine.strategy(base.name, config)

    def check(self, request: AnswerRequest) -> CheckedRequest:
        """Everything that can be refused before model work: documents (keys resolved to token ids), token
        budgets, the strategy and its parameters, the generation options. Tokenizes each piece once."""
        from ragkv.middleware.context import PrepareRequest

        chunks: list[list[int]] = []
        for i, document in enumerate(request.documents):
            resolved = self.resolve_document(document, request.readable_namespaces)
            ids = self.chunk_tokens(resolved) if isinstance(resolved, str) else resolved
            if len(ids) > self.max_chunk_tokens:
                raise ConfigError(f"document {i} has {len(ids)} tokens; the limit is {self.max_chunk_tokens}")
            chunks.append(ids)
        query = self.adapter.encode(request.query)
        if not query:
            raise ConfigError("the query must contain at least one token")
        system = self.adapter.encode(request.system) if request.system else None
        total = 1 + len(system or ()) + sum(len(c) for c in chunks) + len(query) + request.generation.max_new_tokens
        if total > self.max_context_tokens:
            raise ConfigError(f"the prompt plus max_new_tokens is {total} tokens; the limit is "
                              f"{self.max_context_tokens}")
        strategy = self.strategy(request.strategy, request.strategy_params)
        generation = request.generation.to_config()
        prepare = PrepareRequest(query=query, chunks=chunks, system=system, namespace=request.namespace)
        return CheckedRequest(prepare, strategy, generation, bool(request.strategy_params))

    def run(self, checked: CheckedRequest, on_token: TokenCallback | None = None) -> Answer:
        """Prepare the prompt with the strategy and decode. ``on_token`` receives text pieces as they come and
        may raise ``Cancelled`` to stop."""
        callback = None
        if on_token is not None:
            def callback(event: Any) -> None:
                if event.text:
                    on_token(event.text)

        self._acquire()
        try:
            try:
                prepared = self.engine.prepare(checked.prepare, strategy=checked.strategy)
            except (IndexError, ValueError, TypeError) as exc:
                if not checked.custom_strategy:
                    raise
                # a parameter the config accepted but this model cannot honour (e.g. a check layer it lacks)
                raise ConfigError(f"strategy parameters rejected for this model: {exc}") from exc
            prompt_tokens = len(prepared.input_ids)
            result = self.engine.generate(prepared, checked.generation, on_token=callback)
        finally:
            self._model_lock.release()
        return _answer_from(result, prepared, prompt_tokens)

    def answer(self, request: AnswerRequest, on_token: TokenCallback | None = None) -> Answer:
        """``check`` then ``run``: one RAG answer."""
        return self.run(self.check(request), on_token)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"model": self.info.to_dict(), "adapter": self.adapter.describe(), "store": repr(self.store)}

    def close(self) -> None:
        if self._own_store:
            self.store.close()

    def __enter__(self) -> RagRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answer_from(result: Any, prepared: Any, prompt_tokens: int) -> Answer:
    timings = {k: float(v) * 1e3 for k, v in prepared.timings.items()}
    timings["prepare"] = result.prepare_s * 1e3
    timings["first_token"] = max(result.ttft_s - result.prepare_s, 0.0) * 1e3
    timings["ttft"] = result.ttft_s * 1e3
    timings["total"] = result.total_s * 1e3
    reports = [DocumentReport(index=c.index, key=c.key, tokens=c.num_tokens, hit=bool(c.hit), tier=c.tier,
                              codec=c.codec, source=c.source, recomputed_tokens=int(c.recomputed_tokens),
                              load_ms=float(c.load_seconds) * 1e3) for c in prepared.chunks]
    return Answer(text=result.text, finish_reason=result.finish_reason, strategy=result.strategy,
                  ttft_s=result.ttft_s, total_s=result.total_s, timings_ms=timings, documents=reports,
                  prompt_tokens=prompt_tokens, completion_tokens=len(result.token_ids))


def config_from_params(config_class: type, params: Mapping[str, Any]) -> Any:
    """Build a frozen strategy config from JSON values, converting lists to tuples and nested objects to
    nested configs. Unknown names and wrong types raise ``ConfigError`` naming what is allowed."""
    if not dataclasses.is_dataclass(config_class):
        raise ConfigError(f"{config_class.__name__} takes no parameters")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(f"unknown strategy parameters {unknown}; allowed: {sorted(fields)}")
    defaults = config_class()
    values: dict[str, Any] = {}
    for name, value in params.items():
        values[name] = _convert(name, value, getattr(defaults, name))
    try:
        return config_class(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid strategy parameters: {exc}") from exc


def _convert(name: str, value: Any, default: Any) -> Any:
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"strategy parameter {name!r} must be an object")
        return config_from_params(type(default), value)
    if value is None:
        if default is None:
            return None
        raise ConfigError(f"strategy parameter {name!r} may not be null")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"strategy parameter {name!r} must be a boolean")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"strategy parameter {name!r} must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"strategy parameter {name!r} must be a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"strategy parameter {name!r} must be a string")
        return value
    if isinstance(default, tuple) or default is None:
        if isinstance(value, list):
            if len(value) > 256 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"strategy parameter {name!r} must be a list of at most 256 numbers")
            return tuple(value)
        if default is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise ConfigError(f"strategy parameter {name!r} must be a list of numbers")
    raise ConfigError(f"strategy parameter {name!r} cannot be set through this interface")


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
    "RagRuntime",
    "config_from_params",
    "readable_namespaces",
]
