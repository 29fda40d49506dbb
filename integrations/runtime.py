"""``RagRuntime``: one model, one store, one ``ContextEngine``, shared by every door (REST, CLI, LangChain, LlamaIndex).

Why one object: every integration does the same three things — warm chunk texts, answer a query over
documents (texts or stored chunk keys) with a strategy, and report what the cache did — and the engine is
not thread-safe (its prefix cache, cost model and the model's own decoding state). All model work runs on
one ``Scheduler`` worker: concurrent answers are decoded together in one batch (continuous batching), warm
jobs run in small units at a lower priority, and a full queue is refused with ``Overloaded`` instead of
growing without bound. Store-only work (chunk get/put, key checks) never waits for it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from typing_extensions import Self

from ragkv.codecs.transform_basis import TransformBasis
from ragkv.integrations.answers import (
    Answer,
    AnswerRequest,
    CheckedRequest,
    Document,
    Forbidden,
    GenerationOptions,
    NotFound,
    TokenCallback,
    answer_from,
)
from ragkv.integrations.models import LoadedModel, ModelInfo, load_model, make_adapter
from ragkv.integrations.strategy_params import config_from_params
from ragkv.kvstore import ChunkKV, ModelMismatch, TieredStore, check_key, key_namespace
from ragkv.kvstore.container import decode_entry
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.abstract_selection import AbstractsConfig
from ragkv.middleware.abstracts import abstract_key
from ragkv.middleware.calibration import load_calibration
from ragkv.middleware.codec_calibration import load_codec_calibration, use_codec_calibration
from ragkv.middleware.handoff import DEFAULT_HANDOFF_TTL_S, Handoff
from ragkv.middleware.model_registry import models_dir
from ragkv.middleware.near_duplicate_reuse import NearDuplicateConfig
from ragkv.middleware.scheduler import Scheduler, SchedulerConfig

DEFAULT_DEVICE_TIER = "1GB"  # the device tier the embedded default store gets when the model is on a GPU
WARM_UNIT_CHUNKS = 2  # chunks prefilled per warm unit: small, so generation waits at most one unit


class RagRuntime:
    """Model + store + engine, model work on one scheduler. A context manager; ``close`` stops the scheduler and
    closes the store it opened. ``max_waiting``/``wait_timeout_s`` override the scheduler config's."""

    def __init__(self, loaded: LoadedModel, store: TieredStore, *, max_waiting: int | None = None,
                 wait_timeout_s: float | None = None, scheduler: SchedulerConfig | None = None,
                 own_store: bool = False, engine_config: Any = None,
                 max_chunk_tokens: int = 4096, max_context_tokens: int | None = None,
                 use_calibration: bool = True, calibration_dir: str | Path | None = None,
                 near_duplicates: bool = False, abstracts: bool | AbstractsConfig = False) -> None:
        from ragkv.middleware.engine import ContextEngine, EngineConfig

        self.loaded = loaded
        self.info: ModelInfo = loaded.info
        self.adapter = make_adapter(loaded)
        self.store = store
        if engine_config is None:
            if not isinstance(abstracts, AbstractsConfig):
                abstracts = AbstractsConfig(enabled=bool(abstracts))
            engine_config = EngineConfig(near_duplicates=NearDuplicateConfig(enabled=near_duplicates),
                                         abstracts=abstracts)
        self.engine = ContextEngine(self.adapter, store, engine_config)
        if self.engine.near_duplicates.enabled:  # what earlier processes stored can be a near-duplicate too
            self.engine.near_duplicates.index_store()
        # what ``ragkv calibrate`` saved for this model (default: in the models directory); blend and auto use it
        # and the transform codec's basis, whose bytes the store keeps
        self.transform_basis: TransformBasis | None = None
        if use_calibration:
            folder = models_dir() if calibration_dir is None else calibration_dir
            fingerprint = str(self.adapter.fingerprint)
            self.engine.use_calibration(load_calibration(folder, fingerprint))
            self.transform_basis = use_codec_calibration(load_codec_calibration(folder, fingerprint))
        overrides = {"max_waiting": max_waiting, "wait_timeout_s": wait_timeout_s}
        config = dataclasses.replace(scheduler or SchedulerConfig(),
                                     **{k: v for k, v in overrides.items() if v is not None})
        self.scheduler = Scheduler(self.adapter, config)
        self.max_waiting = config.max_waiting
        self._own_store = own_store
        # Budgets that keep one request's compute and memory bounded: a chunk is prefilled alone, a prompt
        # (plus its generation) is bounded by the model's trained positions unless told otherwise.
        self.max_chunk_tokens = max_chunk_tokens
        positions = getattr(self.adapter.config, "max_position_embeddings", None)
        self.max_context_tokens = max_context_tokens or int(positions or 16384)
        # No blob may claim more KV than the largest chunk this model makes (decompression bombs).
        store.limit_entries(self.chunk_bytes(max_chunk_tokens) // self.adapter.dtype.itemsize)

    @classmethod
    def open(cls, store: str | TieredStore | None = None, model: str | None = None, *, dtype: str | None = None,
             device: str | None = "auto", **kwargs: Any) -> RagRuntime:
        """Open a store (spec, config file, or None for the embedded default) and load a model (None: default)
        on ``device`` (auto: the GPU when there is one). With the model on a GPU, the embedded default store
        gets a device tier in front (``DEFAULT_DEVICE_TIER``)."""
        loaded = load_model(model, dtype=dtype, device=device)
        if isinstance(store, TieredStore):
            return cls(loaded, store, **kwargs)
        opened = TieredStore(default_store_on(loaded.model.device.type, store))
        try:
            return cls(loaded, opened, own_store=True, **kwargs)
        except BaseException:
            opened.close()
            raise

    @property
    def waiting(self) -> int:
        """Answer requests queued for the model and not yet started."""
        return self.scheduler.waiting

    # -- warming -------------------------------------------------------------------------------------------------
    def chunk_tokens(self, text: str) -> list[int]:
        return self.engine.cacher.tokens(text)

    def chunk_bytes(self, tokens: int) -> int:
        """Bytes of decoded KV for a chunk of ``tokens`` tokens with this model."""
        a = self.adapter
        return a.num_layers * 2 * a.num_kv_heads * tokens * a.head_dim * a.dtype.itemsize

    def check_blob(self, key: str, header: Any) -> None:
        """A blob offered for ``key`` must be what this server would store there: this model's fingerprint,
        dtype and geometry, a chunk of at most ``max_chunk_tokens`` cached at position 1, and ``key`` the
        content hash of its metadata. ``ConfigError`` naming the first mismatch."""
        a, meta = self.adapter, header.meta
        if meta.fingerprint != str(a.fingerprint):
            raise ConfigError("the blob was computed by another model than the one this server runs")
        tokens = len(meta.token_ids)
        if not 1 <= tokens <= self.max_chunk_tokens:
            raise ConfigError(f"the blob holds {tokens} tokens; the limit is {self.max_chunk_tokens}")
        expected = (a.num_layers, 2, a.num_kv_heads, tokens, a.head_dim)
        if tuple(header.shape) != expected or header.dtype != a.dtype_name:
            raise ConfigError(f"the blob's KV is {tuple(header.shape)} {header.dtype}; this model makes "
                              f"{expected} {a.dtype_name}")
        if meta.position != 1 or not meta.rope:
            raise ConfigError("the blob's KV was not computed at position 1 with rotary embedding applied")
        if self.engine.cacher.key(list(meta.token_ids), key_namespace(key)) != key:
            raise ConfigError(f"{key} is not the content key of the blob's token ids in its namespace")

    def key_for(self, text: str, namespace: str) -> str:
        """The store key a chunk text gets in ``namespace`` (content hash; no model work)."""
        return self.engine.cacher.key(self.chunk_tokens(text), namespace)

    def warm(self, texts: Sequence[str], namespace: str, *, ttl_s: float | None = None, pin: bool = False) -> Any:
        """Compute and store the KV of every text not already stored; returns the middleware's ``WarmReport``."""
        token_lists = [self.chunk_tokens(t) for t in texts]
        for i, ids in enumerate(token_lists):
            if len(ids) > self.max_chunk_tokens:
                raise ConfigError(f"text {i} has {len(ids)} tokens; the limit is {self.max_chunk_tokens}")
        units = [lambda part=token_lists[i:i + WARM_UNIT_CHUNKS]: self.engine.warm(  # type: ignore[misc]
                     part, namespace=namespace, ttl_s=ttl_s, pin=pin)
                 for i in range(0, len(token_lists), WARM_UNIT_CHUNKS)]
        return merge_warm_reports(self.scheduler.warm(units))

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
        """Everything that can be refused before model work: documents (keys resolved to token ids), the prompt
        rendered with the chat template, token budgets, the strategy and its parameters, the generation
        options. Tokenizes each piece once; the engine then lays the token ids out as they are."""
        from ragkv.middleware.context import PrepareRequest

        chunks: list[list[int]] = []
        for i, document in enumerate(request.documents):
            resolved = self.resolve_document(document, request.readable_namespaces)
            ids = self.chunk_tokens(resolved) if isinstance(resolved, str) else resolved
            if len(ids) > self.max_chunk_tokens:
                raise ConfigError(f"document {i} has {len(ids)} tokens; the limit is {self.max_chunk_tokens}")
            chunks.append(ids)
        parts = self.engine.template.parts(request.query, request.system, request.history)
        total = len(parts.opening) + sum(len(c) for c in chunks) + len(parts.closing)
        total += request.generation.max_new_tokens
        if total > self.max_context_tokens:
            raise ConfigError(f"the prompt plus max_new_tokens is {total} tokens; the limit is "
                              f"{self.max_context_tokens}")
        strategy = self.strategy(request.strategy, request.strategy_params)
        generation = request.generation.to_config()
        prepare = PrepareRequest(query=parts.closing, chunks=chunks, system=parts.opening,
                                 namespace=request.namespace, lookup_namespaces=request.lookup_namespaces,
                                 store_misses=request.store_budget_bytes is None
                                 or self.chunk_bytes(sum(len(c) for c in chunks)) <= request.store_budget_bytes)
        return CheckedRequest(prepare, strategy, generation, bool(request.strategy_params))

    def cached_fraction(self, prepare: Any) -> float:
        """Share of the prompt's chunk tokens already in the store (the scheduler serves cached prompts first)."""
        chunks = prepare.chunks
        total = sum(len(c) for c in chunks)
        if not total:
            return 1.0
        keys = [self.engine.cacher.key(c, prepare.namespace) for c in chunks]
        present = self.store.contains_many(keys)
        return sum(len(c) for c, here in zip(chunks, present) if here) / total

    def run(self, checked: CheckedRequest, on_token: TokenCallback | None = None) -> Answer:
        """Prepare the prompt with the strategy and decode, in the scheduler's batch. ``on_token`` receives text
        pieces as they come (in this thread) and may raise ``Cancelled`` to stop."""
        def prepare() -> Any:
            try:
                return self.engine.prepare(checked.prepare, strategy=checked.strategy)
            except (IndexError, ValueError, TypeError) as exc:
                if not checked.custom_strategy:
                    raise
                # a parameter the config accepted but this model cannot honour (e.g. a check layer it lacks)
                raise ConfigError(f"strategy parameters rejected for this model: {exc}") from exc

        result, prepared = self.scheduler.generate(prepare, checked.generation, on_token=_text_pieces(on_token),
                                                   cached_fraction=self.cached_fraction(checked.prepare))
        return answer_from(result, prepared, len(prepared.input_ids))

    def prefill(self, checked: CheckedRequest, namespace: str, ttl_s: float | None = DEFAULT_HANDOFF_TTL_S
                ) -> tuple[Handoff, Answer]:
        """Prepare the prompt (in the scheduler, like an answer) and publish it in ``namespace`` for a decode
        worker (``ragkv.middleware.handoff``); no token is decoded. Returns the hand-off and the prepare's report
        (documents, timings)."""
        from ragkv.middleware.generation import GenerationConfig

        published: list[Handoff] = []

        def prepare() -> Any:
            prepared = self.engine.prepare(checked.prepare, strategy=checked.strategy)
            published.append(self.engine.publish(prepared, namespace, ttl_s))
            return prepared

        # one token, sampled from the prepared logits without a forward pass: the job ends after its prepare
        result, prepared = self.scheduler.generate(prepare, GenerationConfig(max_new_tokens=1),
                                                   cached_fraction=self.cached_fraction(checked.prepare))
        return published[0], answer_from(result, prepared, len(prepared.input_ids))

    def decode(self, handle: str, namespace: str, generation: GenerationOptions) -> Answer:
        """Decode from a context another process published under ``handle``, which must be in ``namespace``
        (the caller's own: hand-offs are never shared). The entry is used once."""
        if key_namespace(check_key(handle)) != namespace:
            raise Forbidden("a hand-off can only be resumed by the tenant that published it")
        result, prepared = self.scheduler.generate(lambda: self.engine.resume(handle), generation.to_config(),
                                                   cached_fraction=1.0)
        return answer_from(result, prepared, len(prepared.input_ids))

    def answer(self, request: AnswerRequest, on_token: TokenCallback | None = None) -> Answer:
        """``check`` then ``run``: one RAG answer."""
        return self.run(self.check(request), on_token)

    def calibration_summary(self) -> dict[str, Any] | None:
        """What ``blend`` and ``auto`` were calibrated with, or None when no calibration is in use."""
        calibration = self.engine.calibration
        if calibration is None:
            return None
        choice = calibration.choice
        return {"target": calibration.target, "prompts": calibration.prompts,
                "choice": choice.name if choice else None, "agreement": choice.agreement if choice else None,
                "default_blend": "calibrated choice" if choice else "every row recomputed (no candidate met the target)"}

    def near_duplicate_summary(self) -> dict[str, Any]:
        """Whether misses are repaired from stored near-duplicates, how many chunks are indexed, repairs made."""
        near = self.engine.near_duplicates
        return {"enabled": near.enabled, "indexed": len(near.index), "hits": near.hits,
                "similarity": near.config.similarity, "min_reused": near.config.min_reused}

    def abstracts_summary(self) -> dict[str, Any]:
        """Whether chunk abstracts leave chunks out, with what threshold, and how many were written, read and
        left out (process-wide counts)."""
        return self.engine.abstracts.summary()

    def chunk_uploaded(self, key: str, blob: bytes, token_ids: Sequence[int], ttl_s: float | None = None) -> None:
        """A chunk blob stored as it is (``PUT /v1/chunks``): indexed as a near-duplicate source at once and, when
        abstracts are on, decoded once to give it its abstract."""
        self.engine.near_duplicates.observe(key, token_ids)
        if self.engine.abstracts.enabled:
            chunk = decode_entry(blob, self.store.limits, key)[1]
            self.engine.abstracts.write(key, chunk.kv, chunk.meta.position, ttl_s)

    def delete_chunk(self, key: str) -> bool:
        """Delete a chunk from every tier, with its abstract; True when the chunk was stored."""
        removed = self.store.delete(key)
        try:
            self.store.delete(abstract_key(key))
        except ConfigError:  # a key too long to have an abstract
            pass
        self.engine.abstracts.forget([key])
        return removed

    def codec_calibration_summary(self) -> dict[str, Any] | None:
        """The transform basis this model's chunks are coded with by default, or None when none is in use."""
        basis = self.transform_basis
        if basis is None:
            return None
        return {"transform_basis": basis.digest, "layer_group": basis.layer_group, "rank": basis.rank}

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"model": self.info.to_dict(), "adapter": self.adapter.describe(), "store": repr(self.store)}

    def close(self) -> None:
        self.scheduler.close()
        if self._own_store:
            self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text_pieces(on_token: TokenCallback | None) -> Any:
    """A scheduler token callback that hands ``on_token`` each event's text piece (None: no callback)."""
    if on_token is None:
        return None

    def callback(event: Any) -> None:
        if event.text:
            on_token(event.text)
    return callback


def default_store_on(device_type: str, store: str | None) -> Any:
    """``store`` as given; None with the model on CUDA (and no $RAGKV_STORE): the embedded default with a
    device tier in front."""
    import os

    from ragkv.kvstore.config import ENV_SPEC, StoreConfig, default_config, parse_size
    from ragkv.kvstore.tiers.device import DeviceConfig

    if store is not None or device_type != "cuda" or os.environ.get(ENV_SPEC):
        return store
    default = default_config()
    device = DeviceConfig(device="cuda", capacity_bytes=parse_size(DEFAULT_DEVICE_TIER))
    return StoreConfig(tiers=(device, *default.tiers))


def merge_warm_reports(reports: Sequence[Any]) -> Any:
    """One ``WarmReport`` from the reports of consecutive parts of a warm."""
    from ragkv.middleware.chunking import WarmReport

    merged = WarmReport()
    for report in reports:
        merged.keys.extend(report.keys)
        merged.computed += report.computed
        merged.already_cached += report.already_cached
        merged.tokens_computed += report.tokens_computed
        merged.seconds += report.seconds
    return merged


__all__ = ["DEFAULT_DEVICE_TIER", "RagRuntime", "default_store_on", "merge_warm_reports"]
