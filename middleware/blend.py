"""``blend``: selective recompute over re-rotated cached chunks; which rows are recomputed is the rule's choice.

Every rule recomputes the query rows (and chunks recomputed from text, ``auto``) in every layer, writes the
recomputed rows' K/V over the cached K/V and attends with the exact causal mask. What else is recomputed:

- ``deviation`` (CacheBlend): every cached row is computed in the layers up to the last check layer
  (default layers 2 and 3); at each check layer the rows whose fresh K (or V) deviates most from the cached,
  re-rotated K (V) stay active (gradual filtering: ``2 * ratio`` after the first, ``ratio`` at the last).
  Its compute share is therefore at least (last check layer + 1) / layers, whatever the ratio.
- ``query``: a first pass computes only the query rows against the cached KV and ranks cached tokens by the
  attention the query gives them (``query_selection``); the top ``ratio`` is recomputed in every layer, or,
  with check layers, ``2 * ratio`` at first, re-ranked by the query's attention at each check layer.
- ``stored``: each chunk's most important tokens by the scores stored with it at warm time (``importance``).
- ``random``: cached tokens at random, the control for the two above.
- ``boundary_tokens=k`` (EPIC): the first k tokens of every chunk are recomputed in every layer; it combines
  with any rule (with ``ratio=0`` and no check layers it is the whole rule).

Why layers 2 and 3 by default for ``deviation``: on the bundled toy model, deviation read at layer 1 missed a
third of the broken cross-boundary tokens, while K deviation read at layers 2-3 ranked them at the top
(``bench/RESULTS.md``, quality; ALGORITHMS.md §2). What each rule keeps on the real model is in
``bench/selection.py``'s results. ``selector="random"`` is the control for such studies; any object with
``select(deviation, count, layer)`` plugs in.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.adapter import exact_causal_mask
from ragkv.middleware.assembly import CHUNK, QUERY
from ragkv.middleware.context import ChunkInfo, PreparedContext, PrepareRequest
from ragkv.middleware.importance import top_by_importance
from ragkv.middleware.query_selection import attention_mass, top_rows
from ragkv.middleware.selective import (
    DEVIATIONS,
    SELECTORS,
    Scorer,
    Selector,
    check_schedule,
    make_selector,
)
from ragkv.middleware.strategies import CachedChunksStrategy, register_strategy

RULES = ("deviation", "query", "stored", "random")


@dataclass(frozen=True)
class BlendConfig:
    ratio: float = 0.15  # fraction of cached chunk tokens recomputed in the deep layers
    # Gradual filtering over layers 2 and 3 (keep 2r after layer 2, r after layer 3). On the bundled model,
    # deviation read at layer 1 finds the broken cross-boundary token only 68% of the time at r=0.15, so a
    # (1, 2) schedule loses answers before layer 2 can see them; (2, 3) met every quality target there
    # (bench/RESULTS.md, quality) for ~3% more compute than (1, 2) on a 24-layer model.
    check_layers: tuple[int, ...] = (2, 3)
    schedule: tuple[float, ...] | None = None  # fraction kept after each check layer (default: 2r -> r)
    deviation: str = "key"  # "key" (LMCache) or "value" (the original repository)
    selector: Any = "deviation"  # "deviation", "random", or a Selector instance
    seed: int = 0  # for the random control
    # EPIC-style boundary repair: the first ``boundary_tokens`` of every cached chunk are recomputed in every
    # layer, whatever the ratio. With ``ratio=0`` and no check layers that is the whole rule: nothing is
    # computed at full width, so its cost is (query + chunks x k) rows per layer.
    boundary_tokens: int = 0
    # "deviation": CacheBlend's rule at the check layers. "query": a cheap first pass computes only the query
    # rows against the cached KV and ranks cached tokens by the attention the query gives them (summed over
    # every layer, pooled over neighbours). With ``check_layers=()`` the top ``ratio`` is recomputed in every
    # layer (single stage); with check layers the first pass keeps ``2 * ratio``, and at each check layer the
    # query's attention over the freshly computed rows re-ranks them down the schedule to ``ratio`` (dual stage).
    # "stored": each chunk's ``ratio`` most important tokens by the scores stored with it at warm time
    # (``ragkv.middleware.importance``), nothing computed to choose them; with check layers the first choice
    # keeps ``2 * ratio`` and the K deviation at the check layers narrows it to ``ratio``.
    # "random": ``ratio`` of the cached tokens at random (seeded), the control for "query" and "stored" (as
    # ``selector="random"`` is the control for "deviation"); with check layers, narrowed like "stored".
    rule: str = "deviation"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.ratio > 0 and not self.check_layers and self.rule == "deviation":
            raise ConfigError("a ratio above 0 needs check layers to select by (check_layers=(2, 3), ...)")
        if any(int(x) < 0 for x in self.check_layers):
            raise ConfigError(f"check_layers must be layer indices >= 0, got {self.check_layers}")
        if type(self.boundary_tokens) is not int or self.boundary_tokens < 0:
            raise ConfigError(f"boundary_tokens must be an integer >= 0, got {self.boundary_tokens!r}")
        if self.deviation not in DEVIATIONS:
            raise ConfigError(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")
        if isinstance(self.selector, str) and self.selector not in SELECTORS:
            raise ConfigError(f"unknown selector {self.selector!r}; allowed: {sorted(SELECTORS)} or a Selector")
        if self.schedule is not None:
            if len(self.schedule) != len(self.check_layers):
                raise ConfigError(f"schedule needs one fraction per check layer ({len(self.check_layers)})")
            if any(not 0.0 <= f <= 1.0 for f in self.schedule):
                raise ConfigError(f"schedule fractions must be in [0, 1], got {self.schedule}")


@register_strategy
class BlendStrategy(CachedChunksStrategy):
    name = "blend"
    config_class = BlendConfig

    def __init__(self, engine: Any, config: Any = None) -> None:
        calibration = getattr(engine, "calibration", None)
        if config is None and calibration is not None:  # blend without arguments: the calibrated choice
            config = calibration.default_blend()
        super().__init__(engine, config)
        c = self.config
        self.selector: Selector = make_selector(c.selector, c.seed) if isinstance(c.selector, str) else c.selector
        self._generator = torch.Generator().manual_seed(c.seed)

    def prepare(self, request: PrepareRequest) -> PreparedContext:
        return self.blend(request, self.config.ratio)

    def blend(self, request: PrepareRequest, ratio: float, text_chunks: Iterable[int] = (),
              sources: dict[int, str] | None = None, details: dict[str, Any] | None = None) -> PreparedContext:
        """Blend at ``ratio``; chunks in ``text_chunks`` are recomputed from their tokens in context (all rows,
        all layers) instead of being loaded; ``sources`` pins the tier each loaded chunk is read from."""
        text_chunks = set(text_chunks)
        prompt, feed, infos, prefix_hit, timings = self._gather(request, skip=text_chunks, sources=sources)
        always = prompt.rows([QUERY])
        if text_chunks:
            text_rows = prompt.rows([CHUNK], chunk_indices=sorted(text_chunks))
            always = torch.unique(torch.cat((text_rows, always)))
        loaded = [s for s in prompt.chunks if s.index not in text_chunks]
        cached = prompt.rows([CHUNK], chunk_indices=[s.index for s in loaded])
        candidates = cached
        k = self.config.boundary_tokens
        if k:
            boundary = torch.tensor([r for s in loaded for r in range(s.start, min(s.start + k, s.end))],
                                    dtype=torch.long)
            always = torch.unique(torch.cat((boundary, always)))
            candidates = candidates[~torch.isin(candidates, boundary)]
        pool, score, selection_token_layers = int(candidates.numel()), None, 0
        if self.config.rule in ("query", "stored", "random"):
            start = time.perf_counter()
            rerank = bool(self.config.check_layers)  # two stages: the first keeps 2r, the check layers narrow
            first = min(1.0, 2 * ratio) if rerank else ratio
            if self.config.rule == "query":
                chosen, selection_token_layers = self._query_selection(prompt, feed, always, candidates, cached,
                                                                       first)
                score = self._query_scorer(prompt) if rerank else None
            elif self.config.rule == "stored":
                chosen = self._stored_selection(feed, loaded, first)
            else:
                chosen = self._random_selection(candidates, first)
            timings["select"] = time.perf_counter() - start
            if rerank:
                candidates = chosen
            else:
                always, candidates = torch.unique(torch.cat((always, chosen))), candidates[:0]
        if not self.config.check_layers:
            candidates = candidates[:0]  # no selection: nothing but ``always`` is computed, in any layer
        checks = check_schedule(ratio, tuple(self.config.check_layers), self.config.schedule,
                                pool, self.adapter.num_layers) if candidates.numel() else ()
        out, timings["compute"] = self._run(prompt, feed, always=always, candidates=candidates, checks=checks,
                                            selector=self.selector, deviation=self.config.deviation,
                                            cached_rows=cached, score=score)
        final = out.final_rows if out.final_rows is not None else torch.zeros(0, dtype=torch.long)
        by_index = {s.index: s for s in prompt.chunks}
        for info in infos:
            s = by_index.get(info.index)  # None: left out by its abstract
            if s is not None:
                info.recomputed_tokens = int(((final >= s.start) & (final < s.end)).sum())
        for s in prompt.chunks:
            if s.index in text_chunks:
                infos.append(ChunkInfo(index=s.index, key=s.key or "", num_tokens=s.length, position=s.start,
                                       hit=False, source="text", recomputed_tokens=s.length))
        infos.sort(key=lambda i: i.index)
        info = dict(details or {})
        info.update({"ratio": ratio, "checks": [(c.layer, c.keep) for c in checks],
                     "selections": {layer: rows.tolist() for layer, rows in out.selections.items()},
                     "rows_per_layer": out.rows_per_layer, "recomputed_rows": final.tolist(),
                     "selection_token_layers": selection_token_layers,
                     "selector": self.selector.name,
                     "deviation": self.config.deviation, "boundary_tokens": k, "rule": self.config.rule})
        return self._finish(prompt, out, infos, prefix_hit, feed, timings, info)

    def _query_selection(self, prompt: Any, feed: Any, always: torch.Tensor, candidates: torch.Tensor,
                         cached: torch.Tensor, ratio: float) -> tuple[torch.Tensor, int]:
        """The first pass of the query rule: only ``always`` rows computed, the query's attention over the
        cached tokens accumulated at every layer; returns the top ``ratio`` of ``candidates`` and the
        token-layers the pass computed."""
        scores = torch.zeros(prompt.length)
        query_rows = prompt.rows([QUERY])
        n_rep = self.adapter.n_rep

        def observe(layer: int, q: torch.Tensor, rows: torch.Tensor, kv_layer: torch.Tensor, mask: Any) -> None:
            pick = torch.isin(rows, query_rows).nonzero().squeeze(1)
            scores.add_(attention_mass(q[:, :, pick.to(q.device)], kv_layer[0], mask.dense[pick], n_rep))

        out, _ = self._run(prompt, feed, always=always, observe=observe, cached_rows=cached)
        return top_rows(scores, candidates, round(ratio * candidates.numel())), sum(out.rows_per_layer)

    def _stored_selection(self, feed: Any, loaded: list[Any], ratio: float) -> torch.Tensor:
        """The stored rule: from each cached chunk, its ``ratio`` most important tokens by the scores stored
        with it at warm time (after the boundary tokens, which are recomputed anyway)."""
        k = self.config.boundary_tokens
        rows: list[int] = []
        for s in loaded:
            scores = feed.loaded[s.index].wait_meta().importance
            rest = max(0, s.length - k)
            tail = scores[k:] if len(scores) == s.length else ()
            rows += [s.start + k + i for i in top_by_importance(tail, rest, round(ratio * rest))]
        return torch.tensor(rows, dtype=torch.long)

    def _random_selection(self, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
        """The control for rules without check layers: ``ratio`` of the cached tokens, uniformly at random."""
        count = round(ratio * candidates.numel())
        order = torch.randperm(candidates.numel(), generator=self._generator)[:count]
        return torch.sort(candidates[order]).values

    def _query_scorer(self, prompt: Any) -> Scorer:
        """The second stage of the query rule: at a check layer, rank the candidates by the attention the
        query rows give them there, now that the candidates' own K is freshly computed (ProphetKV)."""
        query_rows = prompt.rows([QUERY])
        positions = torch.arange(prompt.length)
        visible = exact_causal_mask(positions[query_rows], positions)
        n_rep = self.adapter.n_rep

        def score(layer: int, q: torch.Tensor, active: torch.Tensor, slots: torch.Tensor,
                  kv_layer: torch.Tensor) -> torch.Tensor:
            pick = torch.isin(active, query_rows).nonzero().squeeze(1)
            return attention_mass(q[:, :, pick.to(q.device)], kv_layer[0], visible, n_rep)[slots]

        return score


__all__ = ["RULES", "BlendConfig", "BlendStrategy"]
