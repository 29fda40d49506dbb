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

With a calibration on the engine (``engine.use_calibration``), ``auto`` is quality-aware instead: it considers
only the calibrated configurations whose agreement with full prefill meets the target, plans steps 1-2 for
each with its measured compute share, and takes the one with the least predicted ``max(load, compute)``; if
none meets the target, every chunk is recomputed from its text. Either way ``details["choice"]`` says what
was chosen.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.assembly import AssembledPrompt
from ragkv.middleware.blend import BlendConfig, BlendStrategy
from ragkv.middleware.calibration import Calibration
from ragkv.middleware.context import PreparedContext, PrepareRequest
from ragkv.middleware.selective import check_schedule
from ragkv.middleware.strategies import Strategy, register_strategy


@dataclass(frozen=True)
class AutoConfig:
    min_ratio: float = 0.15
    max_ratio: float = 0.5
    allow_recompute: bool = True  # may choose to recompute a cached chunk from its text
    blend: BlendConfig = field(default_factory=BlendConfig)  # check layers, schedule, deviation, selector
    # With a calibration on the engine: the agreement to meet (None: the calibration's own target).
    target_agreement: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_ratio <= self.max_ratio <= 1.0:
            raise ConfigError(f"need 0 <= min_ratio <= max_ratio <= 1, got {self.min_ratio}, {self.max_ratio}")
        if self.target_agreement is not None and not 0.0 < self.target_agreement <= 1.0:
            raise ConfigError(f"target_agreement must be in (0, 1], got {self.target_agreement}")


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
    choice: dict[str, Any] = field(default_factory=dict)  # the configuration chosen, and why

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "load_seconds": self.load_seconds, "compute_seconds": self.compute_seconds,
                "choice": dict(self.choice), "chunks": [c.__dict__ for c in self.chunks]}


# compute seconds for (cached chunk tokens, tokens always computed, tokens of misses prefilled alone)
ComputeModel = Callable[[int, int, int], float]
EVERYTHING_FROM_TEXT = BlendConfig(ratio=0.0, check_layers=())  # with every chunk recomputed from its text


@register_strategy
class AutoStrategy(Strategy):
    name = "auto"
    config_class = AutoConfig

    def __init__(self, engine: Any, config: Any = None) -> None:
        super().__init__(engine, config)
        self.blender = BlendStrategy(engine, self.config.blend)
        self._blenders: dict[str, BlendStrategy] = {}

    def prepare(self, request: PrepareRequest) -> PreparedContext:
        prompt = self.engine.assemble(request)
        calibration = getattr(self.engine, "calibration", None)
        if calibration is None:
            plan, blender = self.plan(prompt), self.blender
        else:
            plan, config = self.plan_calibrated(prompt, calibration)
            name = plan.choice["name"]
            blender = self._blenders.get(name) or self._blenders.setdefault(name, BlendStrategy(self.engine, config))
        recompute = [c.index for c in plan.chunks if c.recompute]
        sources = {c.index: c.source for c in plan.chunks if c.source is not None and not c.recompute}
        prepared = blender.blend(request, plan.ratio, text_chunks=recompute, sources=sources,
                                 details={"plan": plan.to_dict(), "choice": dict(plan.choice)})
        prepared.strategy = self.name
        return prepared

    # -- planning --------------------------------------------------------------------------------------------
    def _token_bytes(self) -> int:
        a = self.adapter
        return a.num_layers * 2 * a.num_kv_heads * a.head_dim * a.dtype.itemsize

    def _deviation_compute(self, ratio: float) -> ComputeModel:
        """Estimated compute of the configured rule at ``ratio``: misses prefilled alone, then the blend rows
        summed over layers (every cached row up to the check layers, then the schedule's)."""
        layers = self.adapter.num_layers
        c = self.config.blend

        def compute(cached_tokens: int, fixed_tokens: int, miss_tokens: int) -> float:
            checks = check_schedule(ratio, tuple(c.check_layers), c.schedule, cached_tokens, layers)
            rows = 0
            active = cached_tokens
            keep_after = {ch.layer: ch.keep for ch in checks}
            for layer in range(layers):
                rows += active + fixed_tokens
                if layer in keep_after:
                    active = keep_after[layer]
            return self.engine.costs.compute_seconds(rows + miss_tokens * layers)

        return compute

    def _holders(self, prompt: AssembledPrompt) -> list[ChunkPlan]:
        """Each cached chunk on its cheapest holder; a miss has no source."""
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
        return chunks

    @staticmethod
    def _totals(chunks: list[ChunkPlan], query: int, compute: ComputeModel) -> tuple[float, float]:
        load = sum(c.load_seconds for c in chunks if c.source is not None and not c.recompute)
        cached = sum(c.tokens for c in chunks if not c.recompute)
        fixed = query + sum(c.tokens for c in chunks if c.recompute)
        misses = sum(c.tokens + 1 for c in chunks if c.source is None)
        return load, compute(cached, fixed, misses)

    def _move_to_text(self, chunks: list[ChunkPlan], query: int, compute: ComputeModel) -> None:
        """Greedily recompute from text the chunks slowest to load per token, while that lowers the total."""
        if not self.config.allow_recompute:
            return
        movable = sorted((c for c in chunks if c.source is not None), key=lambda c: -c.load_seconds / c.tokens)
        for c in movable:
            before = max(self._totals(chunks, query, compute))
            c.recompute = True
            if max(self._totals(chunks, query, compute)) >= before:
                c.recompute = False
                break

    def plan(self, prompt: AssembledPrompt) -> Plan:
        """Without a calibration: the configured rule, its ratio the largest in [min, max] hidden by loading."""
        chunks = self._holders(prompt)
        query = prompt.query.length
        cfg = self.config
        self._move_to_text(chunks, query, self._deviation_compute(cfg.min_ratio))
        ratio = cfg.min_ratio
        steps = round((cfg.max_ratio - cfg.min_ratio) / 0.01)
        for i in range(steps + 1):
            r = cfg.min_ratio + i * 0.01
            load, compute = self._totals(chunks, query, self._deviation_compute(r))
            if compute <= load:
                ratio = r
            else:
                break
        load, compute = self._totals(chunks, query, self._deviation_compute(ratio))
        choice = {"calibrated": False, "name": f"{cfg.blend.rule} {round(ratio, 4)}", "rule": cfg.blend.rule}
        return Plan(chunks, round(ratio, 4), load, compute, choice)

    def plan_calibrated(self, prompt: AssembledPrompt, calibration: Calibration) -> tuple[Plan, BlendConfig]:
        """Quality-aware: of the calibrated configurations meeting the target agreement, the one with the least
        predicted time, ``max(load, compute)`` (ties: the higher agreement). None meeting it: every chunk is
        recomputed from its text (exact)."""
        target = calibration.target if self.config.target_agreement is None else self.config.target_agreement
        layers = self.adapter.num_layers
        query = prompt.query.length
        costs = self.engine.costs
        holders = self._holders(prompt)  # where each chunk is: looked up once, whatever the candidates
        best: tuple[tuple[float, float], Plan, BlendConfig] | None = None
        for point in calibration.points:
            if point.agreement < target:
                continue
            share = point.cached_share

            def compute(cached: int, fixed: int, misses: int, share: float = share) -> float:
                return costs.compute_seconds((share * cached + fixed + misses) * layers)

            chunks = [replace(c) for c in holders]
            self._move_to_text(chunks, query, compute)
            load, seconds = self._totals(chunks, query, compute)
            choice = {"calibrated": True, "name": point.name, "agreement": point.agreement, "target": target,
                      "predicted_seconds": max(load, seconds)}
            key = (max(load, seconds), -point.agreement)
            if best is None or key < best[0]:
                best = (key, Plan(chunks, point.config.ratio, load, seconds, choice), point.config)
        if best is not None:
            return best[1], best[2]
        chunks = holders
        for c in chunks:
            c.recompute = c.source is not None
        total = sum(c.tokens for c in chunks) + query
        seconds = costs.compute_seconds(total * layers)
        choice = {"calibrated": True, "name": "recompute everything", "agreement": 1.0, "target": target,
                  "predicted_seconds": seconds}
        return Plan(chunks, 0.0, 0.0, seconds, choice), EVERYTHING_FROM_TEXT


__all__ = ["AutoConfig", "AutoStrategy", "ChunkPlan", "Plan"]
