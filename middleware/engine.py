"""``ContextEngine``: one model adapter + one store, and the shared pieces every strategy uses.

    engine = ContextEngine(ModelAdapter(model, tokenizer), store)   # or ContextEngine.open() (SmolLM2)
    engine.warm(corpus_texts)                                   # precompute chunk KV, one call
    ctx = engine.prepare(PrepareRequest(query, chunks, system), strategy="blend")
    result = engine.generate(ctx, GenerationConfig(max_new_tokens=64))

The engine renders prompts with the model's chat template (``PromptTemplate``: opening, documents, closing),
assembles them, serves the exact prefix (the opening) from a bounded ``PrefixCache``, loads cached chunks (layer-wise pipelined from slow tiers), and computes misses
alone behind the start token, stores them and uses them (the next request hits).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ragkv.kvstore.chunk import DEFAULT_NAMESPACE, ChunkKV, check_namespace
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.abstract_selection import AbstractsConfig, ChunkAbstracts
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.assembly import AssembledPrompt, assemble
from ragkv.middleware.chunking import ChunkCacher, ChunkingConfig, WarmReport
from ragkv.middleware.context import ChunkInfo, PreparedContext, PrepareRequest
from ragkv.middleware.costs import CostModel
from ragkv.middleware.handoff import DEFAULT_HANDOFF_TTL_S, Handoff, publish, resume
from ragkv.middleware.loading import ChunkLoader, LoadedChunk
from ragkv.middleware.near_duplicate_reuse import NearDuplicateConfig, NearDuplicateHit, NearDuplicateReuse
from ragkv.middleware.prefix_cache import PrefixCache, PrefixCacheConfig
from ragkv.middleware.prompt_template import DocumentLayout, PromptParts, PromptTemplate

if TYPE_CHECKING:
    from ragkv.middleware.calibration import Calibration


@dataclass(frozen=True)
class EngineConfig:
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    prefix_cache: PrefixCacheConfig = field(default_factory=PrefixCacheConfig)
    pipelined_loading: bool = True  # decode slow-tier chunks layer by layer while computing
    promote_after_load: bool = True  # put chunks read from a slow tier into the faster decoded tiers
    default_strategy: str = "blend"
    near_duplicates: NearDuplicateConfig = field(default_factory=NearDuplicateConfig)  # reuse of edited chunks
    abstracts: AbstractsConfig = field(default_factory=AbstractsConfig)  # leave out chunks the query hardly reads
    layout: DocumentLayout = field(default_factory=DocumentLayout)  # where documents go in the chat template


class ContextEngine:
    def __init__(self, adapter: ModelAdapter, store: Any, config: EngineConfig = EngineConfig()) -> None:
        self.adapter = adapter
        self.store = store
        self.config = config
        chat_template = (getattr(adapter.tokenizer, "chat_template", None)
                         or adapter.family.fallback_chat_template(adapter.tokenizer))
        self.template = PromptTemplate(adapter.tokenizer, adapter.start_token_id, config.layout, chat_template)
        self.cacher = ChunkCacher(adapter, store, config.chunking, separator=self.template.separator)
        self.near_duplicates = NearDuplicateReuse(adapter, store, self.cacher.meta, config.near_duplicates)
        self.cacher.observer = self.near_duplicates.observe
        self.abstracts = ChunkAbstracts(adapter, store, config.abstracts)
        self.cacher.on_stored = lambda key, chunk, ttl_s: self.abstracts.write(key, chunk.kv, chunk.meta.position,
                                                                               ttl_s)
        self.loader = ChunkLoader(adapter, store, promote=config.promote_after_load)
        self.prefix_cache = PrefixCache(config.prefix_cache)
        self.costs = CostModel()
        self.calibration: Calibration | None = None  # see ``use_calibration``
        self._strategies: dict[str, Any] = {}

    @classmethod
    def open(cls, model: str | None = None, store: Any = None, config: EngineConfig = EngineConfig(), *,
             dtype: str | None = None) -> ContextEngine:
        """An engine on a registered model (None: SmolLM2-135M-Instruct, the default; ``toy``) or a local
        HuggingFace folder, over ``store`` (a ``TieredStore``, a spec string, or None for the embedded default).
        """
        from ragkv.kvstore import TieredStore
        from ragkv.middleware.model_registry import load_model

        loaded = load_model(model, dtype=dtype)
        adapter = ModelAdapter(loaded.model, loaded.tokenizer, model_id=loaded.info.name)
        return cls(adapter, store if isinstance(store, TieredStore) else TieredStore(store), config)

    # -- public API --------------------------------------------------------------------------------------------
    def strategy(self, strategy: Any = None, config: Any = None) -> Any:
        """A strategy by name (one instance per name and engine) or a ready instance."""
        from ragkv.middleware.strategies import Strategy, make_strategy

        if isinstance(strategy, Strategy):
            return strategy
        name = strategy or self.config.default_strategy
        if config is not None:
            return make_strategy(name, self, config)
        if name not in self._strategies:
            self._strategies[name] = make_strategy(name, self)
        return self._strategies[name]

    def use_calibration(self, calibration: Calibration | None) -> None:
        """Make a calibration (``ragkv.middleware.calibration``) the default of ``blend`` and the table ``auto``
        chooses from; None goes back to the uncalibrated defaults. It must be this model's."""
        if calibration is not None and calibration.fingerprint != str(self.adapter.fingerprint):
            raise ConfigError("this calibration was measured on another model (its fingerprint differs)")
        self.calibration = calibration
        for name in ("blend", "auto"):
            self._strategies.pop(name, None)

    def prepare(self, request: PrepareRequest, strategy: Any = None) -> PreparedContext:
        start = time.perf_counter()
        prepared = self.strategy(strategy).prepare(request)
        prepared.timings["total"] = time.perf_counter() - start
        return prepared

    def warm(self, chunks: Iterable[str | Sequence[int]], namespace: str = DEFAULT_NAMESPACE, **kwargs: Any
             ) -> WarmReport:
        report = self.cacher.warm(chunks, namespace=namespace, **kwargs)
        if report.tokens_computed:
            self.costs.observe_compute(report.tokens_computed * self.adapter.num_layers, report.seconds)
        if self.abstracts.enabled:  # chunks stored before abstracts were on get theirs now
            for key in dict.fromkeys(report.keys):
                if self.abstracts.read(key) is None:
                    chunk = self.store.get(key)
                    if chunk is not None:
                        self.abstracts.write(key, chunk.kv, chunk.meta.position, kwargs.get("ttl_s"))
        return report

    def generate(self, request: PrepareRequest | PreparedContext, config: Any = None, strategy: Any = None,
                 on_token: Any = None) -> Any:
        from ragkv.middleware.generation import GenerationConfig, generate

        prepared = request if isinstance(request, PreparedContext) else self.prepare(request, strategy)
        return generate(self.adapter, prepared, config or GenerationConfig(), on_token=on_token)

    def stream(self, request: PrepareRequest | PreparedContext, config: Any = None, strategy: Any = None
               ) -> Iterator[str]:
        from ragkv.middleware.generation import GenerationConfig, stream

        prepared = request if isinstance(request, PreparedContext) else self.prepare(request, strategy)
        return stream(self.adapter, prepared, config or GenerationConfig())

    def publish(self, prepared: PreparedContext, namespace: str = DEFAULT_NAMESPACE,
                ttl_s: float | None = DEFAULT_HANDOFF_TTL_S) -> Handoff:
        """Store ``prepared`` under a hand-off key for another process to ``resume`` (``ragkv.middleware.handoff``)."""
        return publish(self, prepared, namespace, ttl_s)

    def resume(self, handle: str | Handoff) -> PreparedContext:
        """The context published under ``handle``, its last prompt token run: ready to ``generate`` from."""
        return resume(self, handle.key if isinstance(handle, Handoff) else handle)

    # -- shared steps ------------------------------------------------------------------------------------------
    def tokens(self, piece: str | Sequence[int] | None) -> list[int]:
        if piece is None:
            return []
        return self.adapter.encode(piece) if isinstance(piece, str) else [int(t) for t in piece]

    def prompt_parts(self, request: PrepareRequest) -> PromptParts:
        """The opening (with the start token once) and closing ids: rendered from the chat template for a text
        query, laid out raw for token ids."""
        if isinstance(request.query, str):
            return self.template.parts(request.query, request.system, request.history)  # type: ignore[arg-type]
        closing = self.tokens(request.query)
        if not closing:
            raise ConfigError("the query must contain at least one token")
        return PromptParts(self.template.with_start(self.tokens(request.system)), closing)

    def assemble(self, request: PrepareRequest, chunk_indices: Sequence[int] | None = None) -> AssembledPrompt:
        """Tokenize each piece alone and lay the prompt out (``chunk_indices``: keep only these chunks)."""
        check_namespace(request.namespace)
        parts = self.prompt_parts(request)
        indices = range(len(request.chunks)) if chunk_indices is None else chunk_indices
        chunk_ids = [self.cacher.tokens(request.chunks[i]) for i in indices]
        keys = self.resolve_keys(chunk_ids, request)
        prompt = assemble(parts.opening, chunk_ids, parts.closing, keys)
        if chunk_indices is not None:  # keep the request's chunk numbering
            from dataclasses import replace

            segs = list(prompt.segments)
            chunk_pos = [i for i, s in enumerate(segs) if s.kind == "chunk"]
            for j, i in zip(chunk_pos, chunk_indices):
                segs[j] = replace(segs[j], index=int(i))
            prompt = AssembledPrompt(tuple(segs))
        self.adapter.check_length(prompt.length)
        return prompt

    def prefix_kv(self, prompt: AssembledPrompt, namespace: str) -> tuple[torch.Tensor, bool]:
        """KV [L, 2, 1, H, P, D] of the exact prefix (the opening), from ``namespace``'s prefix cache or computed."""
        ids = list(prompt.prefix.token_ids)
        entry = self.prefix_cache.get(ids, namespace=namespace)
        if entry is not None:
            return entry.kv, True
        kv = self.adapter.prefill(torch.tensor([ids])).kv
        self.prefix_cache.put(ids, kv, namespace=namespace)
        return kv, False

    def fetch_chunks(self, prompt: AssembledPrompt, request: PrepareRequest, pipelined: bool | None = None,
                     skip: Iterable[int] = (), sources: dict[int, str] | None = None,
                     ) -> tuple[dict[int, LoadedChunk], list[ChunkInfo]]:
        """Load every chunk of the prompt (but ``skip``); misses are computed alone, stored and used."""
        pipelined = self.config.pipelined_loading if pipelined is None else pipelined
        skip = set(skip)
        segs = [s for s in prompt.chunks if s.index not in skip]
        unique: dict[str, Any] = {}
        for s in segs:
            unique.setdefault(s.key, s)
        keys = list(unique)  # resolved by ``assemble``: the first namespace of the lookup order holding each
        token_lists = [list(unique[k].token_ids) for k in keys]
        by_key = {k: i for i, k in enumerate(keys)}
        # a miss, or a stored chunk found unusable, is stored in the request's own namespace only
        write_keys = [self.cacher.key(ids, request.namespace) for ids in token_lists]
        src = None
        if sources:
            src = [None] * len(keys)
            for s in segs:
                if s.index in sources:
                    src[by_key[s.key]] = sources[s.index]

        def recompute(i: int) -> ChunkKV:
            """For a stored chunk that turned out unusable while loading in the background."""
            chunk = self.cacher.compute([token_lists[i]])[0]
            if request.store_misses:
                self._store_chunk(write_keys[i], chunk)
                found = loaded[i]
                if found is not None:
                    found.stored = True
            return chunk

        loaded = self.loader.load(keys, token_lists, pipelined=pipelined, recompute=recompute, sources=src)
        misses = [i for i, c in enumerate(loaded) if c is None]
        stored: set[int] = set()
        near = self._near_duplicates(misses, token_lists, request)
        for i, found in near.items():
            if request.store_misses:
                self._store_chunk(write_keys[i], found.chunk)
                stored.add(i)
            loaded[i] = LoadedChunk(write_keys[i], found.chunk.meta, None, None, found.chunk.nbytes, hit=False,
                                    _full=found.chunk.kv)
        misses = [i for i in misses if i not in near]
        if misses:
            start = time.perf_counter()
            computed = self.cacher.compute([token_lists[i] for i in misses])
            seconds = time.perf_counter() - start
            self.costs.observe_compute(sum(c.num_tokens + 1 for c in computed) * self.adapter.num_layers, seconds)
            for i, chunk in zip(misses, computed):
                if request.store_misses:
                    self._store_chunk(write_keys[i], chunk)
                    stored.add(i)
                loaded[i] = LoadedChunk(write_keys[i], chunk.meta, None, None, chunk.nbytes, hit=False, _full=chunk.kv)
        by_index: dict[int, LoadedChunk] = {}
        infos: list[ChunkInfo] = []
        for s in segs:
            i = by_key[s.key]
            c = loaded[i]
            assert c is not None
            by_index[s.index] = c
            found = near.get(i)
            infos.append(ChunkInfo(index=s.index, key=s.key or "", num_tokens=s.length, position=s.start, hit=c.hit,
                                   tier=c.tier, codec=c.codec,
                                   source="store" if c.hit else "near-duplicate" if found else "computed",
                                   load_seconds=c.load_seconds, stored=i in stored,
                                   near_duplicate_of=found.source_key if found else None,
                                   repaired_tokens=found.repaired_tokens if found else 0))
        return by_index, infos

    def _store_chunk(self, key: str, chunk: ChunkKV) -> None:
        """Store a chunk computed or repaired for a request, index it, and store its abstract."""
        self.store.put(key, chunk)
        self.near_duplicates.observe(key, chunk.meta.token_ids)
        self.abstracts.write(key, chunk.kv, chunk.meta.position)

    def leave_out(self, prompt: AssembledPrompt, prefix_kv: torch.Tensor,
                  exempt: Iterable[int] = ()) -> tuple[AssembledPrompt, list[ChunkInfo], dict[int, float], float]:
        """The prompt without the chunks their abstracts leave out (``ragkv.middleware.abstract_selection``; never
        those in ``exempt``), the left-out chunks' infos, every scored chunk's gap, and the seconds it took."""
        choice = self.abstracts.choose(prompt, prefix_kv, exempt)
        if choice is None:
            return prompt, [], {}, 0.0
        skipped = set(choice.skipped)
        infos = [ChunkInfo(index=s.index, key=s.key or "", num_tokens=s.length, position=-1, hit=False,
                           source="skipped", abstract_gap=choice.gaps[s.index])
                 for s in prompt.chunks if s.index in skipped]
        return prompt.without_chunks(skipped), infos, choice.gaps, choice.seconds

    def _near_duplicates(self, misses: Sequence[int], token_lists: Sequence[Sequence[int]],
                         request: PrepareRequest) -> dict[int, NearDuplicateHit]:
        """Misses repaired from a stored near-duplicate the request may read (see ``near_duplicate_reuse``)."""
        found: dict[int, NearDuplicateHit] = {}
        if not self.near_duplicates.enabled:
            return found
        start = time.perf_counter()
        for i in misses:
            hit = self.near_duplicates.find(token_lists[i], request.lookup)
            if hit is not None:
                found[i] = hit
        if found:
            rows = sum(h.repaired_tokens + 1 for h in found.values()) * self.adapter.num_layers
            self.costs.observe_compute(rows, time.perf_counter() - start)
        return found

    def resolve_keys(self, token_lists: Sequence[Sequence[int]], request: PrepareRequest) -> list[str]:
        """Each chunk's key in the first namespace of ``request.lookup`` that holds it (the tenant's own, then
        shared), else its key in ``request.namespace``, where a miss is stored."""
        if request.lookup == (request.namespace,):
            return [self.cacher.key(ids, request.namespace) for ids in token_lists]
        found: list[str | None] = [None] * len(token_lists)
        for namespace in request.lookup:
            todo = [i for i, f in enumerate(found) if f is None]
            if not todo:
                break
            candidates = [self.cacher.key(token_lists[i], namespace) for i in todo]
            for i, key, present in zip(todo, candidates, self.store.contains_many(candidates)):
                if present:
                    found[i] = key
        return [f if f is not None else self.cacher.key(ids, request.namespace) for f, ids in zip(found, token_lists)]

    def observe_loads(self, loaded: dict[int, LoadedChunk]) -> None:
        """Feed measured load times into the cost model (after the layers were consumed)."""
        seen: set[int] = set()
        for c in loaded.values():
            if id(c) in seen or not c.hit or c.tier is None:
                continue
            seen.add(id(c))
            a = self.adapter
            decoded = c.num_tokens * a.num_layers * 2 * a.num_kv_heads * a.head_dim * a.dtype.itemsize
            self.costs.observe_load(c.tier, decoded, c.load_seconds)

    def chunk_infos_for_prompt(self, prompt: AssembledPrompt, source: str, hit: bool) -> list[ChunkInfo]:
        return [ChunkInfo(index=s.index, key=s.key or "", num_tokens=s.length, position=s.start, hit=hit,
                          tier=None, codec=None, source=source) for s in prompt.chunks]


__all__ = ["ContextEngine", "EngineConfig"]
