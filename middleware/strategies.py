"""Strategies: each turns a ``PrepareRequest`` into a ``PreparedContext`` with one ``prepare`` call.

``full``     plain prefill of the whole prompt (the reference).
``prefix``   exact-prefix reuse: a repeated identical prompt, or a shared system prefix, is a hit; entries
             live in the engine's bounded ``PrefixCache``.
``reuse``    cached chunks concatenated and re-rotated to their positions; only the query is computed.
``blend``    CacheBlend selective recompute (``ragkv.middleware.blend``).
``compress`` query-attention token pruning / chunk-level keep-or-prune (``ragkv.middleware.compress``).
``auto``     per-chunk load-or-recompute and the blend ratio from measured speeds (``ragkv.middleware.controller``).

A registry maps names to classes; every class takes the engine and one frozen config dataclass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.assembly import QUERY, AssembledPrompt, LayerFeed
from ragkv.middleware.context import ChunkInfo, PreparedContext, PrepareRequest
from ragkv.middleware.selective import SelectiveOutput, selective_prefill

if TYPE_CHECKING:
    from ragkv.middleware.engine import ContextEngine


@dataclass(frozen=True)
class NoConfig:
    pass


class Strategy:
    name: ClassVar[str] = ""
    config_class: ClassVar[type] = NoConfig

    def __init__(self, engine: ContextEngine, config: Any = None) -> None:
        self.engine = engine
        self.adapter = engine.adapter
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(f"strategy {self.name!r} takes {self.config_class.__name__}, "
                              f"got {type(self.config).__name__}")

    def prepare(self, request: PrepareRequest) -> PreparedContext:
        raise NotImplementedError


_STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _STRATEGIES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # the modules register themselves on import
    from ragkv.middleware import blend, compress, controller  # noqa: F401


def strategy_names() -> list[str]:
    _load_builtin()
    return sorted(_STRATEGIES)


def make_strategy(name: str, engine: ContextEngine, config: Any = None) -> Strategy:
    _load_builtin()
    if name not in _STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; allowed: {sorted(_STRATEGIES)}")
    return _STRATEGIES[name](engine, config)


# -- full ----------------------------------------------------------------------------------------------------
@register_strategy
class FullStrategy(Strategy):
    """Plain prefill of the whole prompt; touches no store."""

    name = "full"

    def prepare(self, request: PrepareRequest) -> PreparedContext:
        engine, adapter = self.engine, self.adapter
        prompt = engine.assemble(request)
        start = time.perf_counter()
        out = adapter.prefill(torch.tensor([prompt.input_ids]))
        logits = adapter.logits(out.hidden[:, -1:])[0, 0]
        seconds = time.perf_counter() - start
        engine.costs.observe_compute(prompt.length * adapter.num_layers, seconds)
        return PreparedContext(cache=adapter.make_cache(out.kv), logits=logits, input_ids=prompt.input_ids,
                               next_position=prompt.length, chunks=engine.chunk_infos_for_prompt(prompt, "text", False),
                               strategy=self.name, timings={"compute": seconds})


# -- prefix --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefixConfig:
    store_prompts: bool = True  # keep whole prompts (with last-token logits) in the prefix cache
    store_system_prefix: bool = True


@register_strategy
class PrefixStrategy(Strategy):
    """Exact-prefix reuse over segment boundaries; computes whatever follows the longest cached prefix."""

    name = "prefix"
    config_class = PrefixConfig

    def prepare(self, request: PrepareRequest) -> PreparedContext:
        engine, adapter = self.engine, self.adapter
        prompt = engine.assemble(request)
        ids = prompt.input_ids
        n = len(ids)
        tenant = request.lookup[0]
        match = engine.prefix_cache.longest(ids, prompt.boundaries(), namespace=tenant)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if match is not None and match[0] == n:
            kv, logits = match[1].kv, match[1].logits
            assert logits is not None
            matched = n
        else:
            matched = 0 if match is None else match[0]
            past = None if match is None else match[1].kv
            out = adapter.prefill(torch.tensor([ids[matched:]]), start_position=matched, past=past)
            kv = out.kv if past is None else torch.cat((past, out.kv), dim=4)
            logits = adapter.logits(out.hidden[:, -1:])[0, 0]
            engine.costs.observe_compute((n - matched) * adapter.num_layers, time.perf_counter() - start)
            if self.config.store_prompts:
                engine.prefix_cache.put(ids, kv, logits, namespace=tenant)
            p = prompt.prefix.length
            if self.config.store_system_prefix and matched < p:
                engine.prefix_cache.put(ids[:p], kv[:, :, :, :, :p].clone(), namespace=tenant)
        timings["compute"] = time.perf_counter() - start
        infos = []
        for s in prompt.chunks:
            hit = s.end <= matched
            infos.append(ChunkInfo(index=s.index, key=s.key or "", num_tokens=s.length, position=s.start, hit=hit,
                                   tier="prefix" if hit else None, codec=None, source="prefix" if hit else "text"))
        return PreparedContext(cache=adapter.make_cache(kv), logits=logits, input_ids=ids, next_position=n,
                               chunks=infos, strategy=self.name, prefix_hit=matched >= prompt.prefix.length,
                               timings=timings, details={"matched_tokens": matched})


# -- reuse and the shared machinery of strategies over cached chunks ------------------------------------------
class CachedChunksStrategy(Strategy):
    """Base for strategies that assemble cached chunks: prefix from the prefix cache, chunks from the store."""

    def _gather(self, request: PrepareRequest, prompt: AssembledPrompt | None = None, skip: Any = (),
                sources: dict[int, str] | None = None
                ) -> tuple[AssembledPrompt, LayerFeed, list[ChunkInfo], bool, dict[str, float]]:
        """Assemble (or take ``prompt``), serve the prefix, leave out the chunks their abstracts rule out (not for
        a given ``prompt``, never the ``skip`` chunks), and fetch the rest (but ``skip``)."""
        engine = self.engine
        start = time.perf_counter()
        timings: dict[str, float] = {}
        given = prompt is not None
        prompt = prompt if prompt is not None else engine.assemble(request)
        prefix_kv, prefix_hit = engine.prefix_kv(prompt, request.lookup[0])
        left_out: list[ChunkInfo] = []
        gaps: dict[int, float] = {}
        if not given:
            prompt, left_out, gaps, seconds = engine.leave_out(prompt, prefix_kv, exempt=skip)
            if gaps:
                timings["abstracts"] = seconds
        loaded, infos = engine.fetch_chunks(prompt, request, skip=skip, sources=sources)
        for info in infos:
            info.abstract_gap = gaps.get(info.index)
        infos = sorted(infos + left_out, key=lambda i: i.index)
        feed = LayerFeed(self.adapter, prompt, prefix_kv, loaded)
        timings["gather"] = time.perf_counter() - start
        return prompt, feed, infos, prefix_hit, timings

    def _run(self, prompt: AssembledPrompt, feed: Any, **kwargs: Any) -> tuple[SelectiveOutput, float]:
        start = time.perf_counter()
        ids = torch.tensor(prompt.input_ids)
        out = selective_prefill(self.adapter, ids, torch.arange(prompt.length), feed.fill, **kwargs)
        seconds = time.perf_counter() - start
        token_layers = sum(out.rows_per_layer)
        self.engine.costs.observe_compute(token_layers, max(seconds - feed.wait_seconds, 1e-9))
        return out, seconds

    def _finish(self, prompt: AssembledPrompt, out: SelectiveOutput, infos: list[ChunkInfo], prefix_hit: bool,
                feed: Any, timings: dict[str, float], details: dict[str, Any] | None = None,
                kv: torch.Tensor | None = None, next_position: int | None = None) -> PreparedContext:
        loaded = getattr(feed, "loaded", {})
        self.engine.observe_loads(loaded)
        timings["load_wait"] = feed.wait_seconds
        for info in infos:
            c = loaded.get(info.index)
            if c is not None:  # a chunk that failed to decode mid-way was recomputed: report what happened
                info.load_seconds = c.load_seconds
                info.hit, info.tier, info.codec = c.hit, c.tier, c.codec
                info.stored = info.stored or c.stored
                if not c.hit and info.source == "store":
                    info.source = "computed"
        kv = out.kv if kv is None else kv
        return PreparedContext(cache=self.adapter.make_cache(kv), logits=out.logits, input_ids=prompt.input_ids,
                               next_position=prompt.length if next_position is None else next_position,
                               chunks=infos, strategy=self.name, prefix_hit=prefix_hit, timings=timings,
                               details=details or {})


@register_strategy
class ReuseStrategy(CachedChunksStrategy):
    """Cached chunks as they are (re-rotated); only the query rows are computed, over all layers."""

    name = "reuse"

    def prepare(self, request: PrepareRequest) -> PreparedContext:
        prompt, feed, infos, prefix_hit, timings = self._gather(request)
        out, timings["compute"] = self._run(prompt, feed, always=prompt.rows([QUERY]))
        return self._finish(prompt, out, infos, prefix_hit, feed, timings)



__all__ = [
    "CachedChunksStrategy",
    "FullStrategy",
    "NoConfig",
    "PrefixConfig",
    "PrefixStrategy",
    "ReuseStrategy",
    "Strategy",
    "make_strategy",
    "register_strategy",
    "strategy_names",
]
