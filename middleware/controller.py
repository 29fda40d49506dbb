"""``auto``: per chunk, load it (from which tier) or recompute it from its text, and pick the blend ratio.

The controller plans with the engine's ``CostModel`` (measured seconds per token-layer of compute, and
decoded bytes per second per tier, including decoding) and the layer-wise pipeline in mind: loading and
recompute overlap, so a prompt costs about ``max(load time, compute time)``.

1. Each cached chunk starts on its cheapest holder (a chunk held by several tiers, possibly with
   different codecs, is read from the one with the lowest estimated time); a miss is computed alone,
   stored and used, like everywhere else.
2. Greedily, the chunk with the highest load time per token moves to "recompute from text" (all its rows
   computed in context, exact) while that lowers ``max(load, compute)`` at the minimum ratio.
3. The blend ratio is the largest in ``[min_ratio, max_ratio]`` whose recompute still hides behind the
   loading; never below ``min_ratio`` (the quality floor).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.assembly import AssembledPrompt
from ragkv.middleware.blend import BlendConfig, BlendStrategy
from ragkv.middleware.context import PreparedContext, PrepareRequest
from ragkv.middleware.selective import check_schedule
from ragkv.middleware.strategies import Strategy, register_strategy


@dataclass(frozen=True)
class AutoConfig:
    min_ratio: float = 0.15
    max_ratio: float = 0.5
    allow_recompute: bool = True  # may choose to recompute a cached chunk from its text
    blend: BlendConfig = field(default_factory=BlendConfig)  # check layers, schedule, deviation, selector

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_ratio <= self.max_ratio <= 1.0:
            raise ConfigError(f"need 0 <= min_ratio <= max_ratio <= 1, got {self.min_ratio}, {self.max_ratio}")


@dataclass
class ChunkPlan:
    index: int
    tokens: int
    source: str | None  # tier to read from; None: a miss (computed alone and stored)
    load_seconds: float
    recompute: bool = False


@dataclass
class Plan:
    chunks: list[ChunkPlan]
    ratio: float
    load_seconds: float
    compute_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "load_seconds": self.load_seconds, "compute_seconds": self.compute_seconds,
                "chunks": [c.__dict__ for c in self.chunks]}


@register_strategy
class AutoStrategy(Strategy):
    name = "auto"
    config_class = AutoConfig

    def __init__(self, engine: Any, config: Any = None) -> None:
        super().__init__(engine, config)
        self.blender = BlendStrategy(engine, self.config.blend)

    def prepare(self, request: PrepareRequest) -> PreparedContext:
        prompt = self.engine.assemble(request)
        plan = self.plan(prompt)
        recompute = [c.index for c in plan.chunks if c.recompute]
        sources = {c.index: c.source for c in plan.chunks if c.source is not None and not c.recompute}
        prepared = self.blender.blend(request, plan.ratio, text_chunks=recompute, sources=sources,
                                      details={"plan": plan.to_dict()})
        prepared.strategy = self.name
        return prepared

    # -- planning --------------------------------------------------------------------------------------------
    def _token_bytes(self) -> int:
        a = self.adapter
        return a.num_layers * 2 * a.num_kv_heads * a.head_dim * a.dtype.itemsize

    def _compute_seconds(self, ratio: float, cached_tokens: int, fixed_tokens: int, miss_tokens: int) -> float:
        """Estimated compute: misses prefilled alone, then the blend rows summed over layers."""
        layers = self.adapter.num_layers
        c = self.config.blend
        checks = check_schedule(ratio, tuple(c.check_layers), c.schedule, cached_tokens, layers)
        rows = 0
        active = cached_tokens
        keep_after = {ch.layer: ch.keep for ch in checks}
        for layer in range(layers):
            rows += active + fixed_tokens
            if layer in keep_after:
                active = keep_after[layer]
        return self.engine.costs.compute_seconds(rows + miss_tokens * layers)

    def plan(self, prompt: AssembledPrompt) -> Plan:
        costs = self.engine.costs
        token_bytes = self._token_bytes()
        chunks: list[ChunkPlan] = []
        for s in prompt.chunks:
            holders = self.engine.loader.locate(s.key) if s.key else []
            if not holders:
                chunks.append(ChunkPlan(s.index, s.length, None, 0.0))
                continue
            options = [(costs.load_seconds(name, token_bytes * s.length), name) for name, _ in holders]
            seconds, name = min(options)
            chunks.append(ChunkPlan(s.index, s.length, name, seconds))
        query = prompt.query.length
        cfg = self.config

        def totals(ratio: float) -> tuple[float, float]:
            load = sum(c.load_seconds for c in chunks if c.source is not None and not c.recompute)
            cached = sum(c.tokens for c in chunks if not c.recompute)
            fixed = query + sum(c.tokens for c in chunks if c.recompute)
            misses = sum(c.tokens + 1 for c in chunks if c.source is None)
            return load, self._compute_seconds(ratio, cached, fixed, misses)

        if cfg.allow_recompute:
            movable = sorted((c for c in chunks if c.source is not None), key=lambda c: -c.load_seconds / c.tokens)
            for c in movable:
                before = max(totals(cfg.min_ratio))
                c.recompute = True
                if max(totals(cfg.min_ratio)) >= before:
                    c.recompute = False
                    break
        ratio = cfg.min_ratio
        steps = round((cfg.max_ratio - cfg.min_ratio) / 0.01)
        for i in range(steps + 1):
            r = cfg.min_ratio + i * 0.01
            load, compute = totals(r)
            if compute <= load:
                ratio = r
            else:
                break
        load, compute = totals(ratio)
        return Plan(chunks, round(ratio, 4), load, compute)


__all__ = ["AutoConfig", "AutoStrategy", "ChunkPlan", "Plan"]
