"""Selective prefill: compute only chosen rows, layer by layer, against an assembled K/V.

This one loop serves ``reuse`` (only the query rows), ``blend`` (CacheBlend: all cached rows at first, then
the high-deviation ones), ``compress`` (the query rows, observing their attention) and ``auto``.

Per layer ``l``: the feed writes the prefix and the cached chunks into the layer's K/V; the active rows'
q/k/v are computed at their positions; at a check layer the fresh K (or V) of the active *candidate* rows
is compared with their cached K (V) (deviation ``sum over heads, dims of (fresh - cached)^2``; a caller's
``score`` may rank them instead, e.g. by the query's attention) and the selector keeps ``keep`` of them;
the fresh K/V of every row active at this layer is written into the buffer (the rows dropped here still
had fresh K/V computed, so they are used); then the remaining rows
attend over the whole buffer with the exact causal mask and run the MLP. Rows that are never candidates
(the query, chunks recomputed from text) stay active in every layer.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.adapter import ModelAdapter, RowMask

DEVIATIONS = ("key", "value")


class Selector(Protocol):
    """Chooses ``count`` of ``n`` candidate rows at a check layer; returns sorted local indices (long)."""

    name: str

    def select(self, deviation: torch.Tensor, count: int, layer: int) -> torch.Tensor: ...


def select_high_deviation(deviation: torch.Tensor, count: int) -> torch.Tensor:
    """deviation [n] -> indices of the ``count`` largest, ascending."""
    if count >= deviation.numel():
        return torch.arange(deviation.numel())
    return torch.topk(deviation, count).indices.sort().values


class HighDeviationSelector:
    """CacheBlend's rule: the rows whose fresh K/V deviates most from the cached K/V."""

    name = "deviation"

    def select(self, deviation: torch.Tensor, count: int, layer: int) -> torch.Tensor:
        return select_high_deviation(deviation, count)


class RandomSelector:
    """The control: ``count`` rows chosen uniformly at random (seeded), ignoring the deviation."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, deviation: torch.Tensor, count: int, layer: int) -> torch.Tensor:
        n = deviation.numel()
        if count >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=self.generator)[:count].sort().values


SELECTORS: dict[str, Callable[..., Selector]] = {"deviation": HighDeviationSelector, "random": RandomSelector}


def make_selector(name: str, seed: int = 0) -> Selector:
    if name not in SELECTORS:
        raise ConfigError(f"unknown selector {name!r}; allowed: {sorted(SELECTORS)}")
    return RandomSelector(seed) if name == "random" else SELECTORS[name]()


@dataclass(frozen=True)
class CheckLayer:
    layer: int
    keep: int  # candidate rows still active after this layer


Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, RowMask], None]
# score(layer, q, active, candidate_slots, kv_layer) -> [C] scores, called at a check layer after the active
# rows' fresh K/V were written into ``kv_layer``; replaces the K/V deviation as what the selector ranks.
Scorer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Fill = Callable[[int, torch.Tensor, bool], None]


@dataclass
class SelectiveOutput:
    kv: torch.Tensor  # [L, 2, 1, H, N, D]
    logits: torch.Tensor  # [V] float32, last row
    rows_per_layer: list[int] = field(default_factory=list)  # rows computed (projected) per layer
    selections: dict[int, torch.Tensor] = field(default_factory=dict)  # check layer -> kept candidate rows
    final_rows: torch.Tensor | None = None  # rows active in the last layer


@torch.no_grad()
def selective_prefill(adapter: ModelAdapter, ids: torch.Tensor, positions: torch.Tensor, fill: Fill,
                      always: torch.Tensor, candidates: torch.Tensor | None = None,
                      checks: tuple[CheckLayer, ...] = (), selector: Selector | None = None,
                      deviation: str = "key", observe: Observer | None = None,
                      cached_rows: torch.Tensor | None = None, score: Scorer | None = None) -> SelectiveOutput:
    """ids, positions: [N] (slot -> token, absolute position); ``always``/``candidates``: slot indices.

    The last slot must be in ``always`` (its logits are returned). ``observe(layer, q, rows, kv_layer, mask)``
    sees each layer's active queries before attention. ``cached_rows`` (the slots the feed fills from
    cached chunks) lets a layer in which all of them are recomputed skip waiting for the cache
    (``fill(layer, kv_layer, False)``); without it the feed always fills them. ``score`` replaces the K/V
    deviation at check layers (see ``Scorer``).
    """
    if deviation not in DEVIATIONS:
        raise ConfigError(f"deviation must be one of {DEVIATIONS}, got {deviation!r}")
    n = ids.numel()
    device = adapter.device
    positions = positions.to(device)
    candidates = torch.zeros(0, dtype=torch.long) if candidates is None else candidates
    if always.numel() == 0 or int(always.max()) != n - 1:
        raise ValueError("the last slot (the last prompt token) must always be computed")
    selector = selector or HighDeviationSelector()
    is_candidate = torch.zeros(n, dtype=torch.bool)
    is_candidate[candidates] = True
    active = torch.unique(torch.cat((always, candidates)))  # sorted slots
    check_at = {c.layer: c.keep for c in checks}
    is_cached = torch.zeros(n, dtype=torch.bool)
    if cached_rows is not None:
        is_cached[cached_rows] = True
    n_cached = int(is_cached.sum())
    kv = adapter.new_kv(n)
    cos_all, sin_all = adapter.rope(positions)  # [1, N, D]
    hidden = adapter.embed(ids[active][None])  # [1, R, E]
    out = SelectiveOutput(kv=kv, logits=torch.empty(0))
    mask: RowMask | None = None
    which = 0 if deviation == "key" else 1
    for layer in range(adapter.num_layers):
        kv_layer = kv[layer]  # [2, 1, H, N, D]
        needs_cache = cached_rows is None or layer in check_at or int(is_cached[active].sum()) < n_cached
        fill(layer, kv_layer, needs_cache)
        active_dev = active.to(device)
        q, k, v = adapter.project(layer, hidden, (cos_all[:, active_dev], sin_all[:, active_dev]))
        out.rows_per_layer.append(int(active.numel()))
        keep_local: torch.Tensor | None = None
        narrow = False
        if layer in check_at:
            cand_local = is_candidate[active].nonzero().squeeze(1)
            keep = min(check_at[layer], cand_local.numel())
            narrow = keep < cand_local.numel()
            if narrow and score is None:  # the cached K/V is read before the fresh K/V overwrites it
                fresh = (k if which == 0 else v)[0][:, cand_local.to(device)]  # [H, C, D]
                cached = kv_layer[which, 0][:, active[cand_local].to(device)]  # [H, C, D]
                ranking = (fresh.float() - cached.float()).pow(2).sum(dim=(0, 2)).cpu()  # [C]
        kv_layer[0, :, :, active_dev] = k
        kv_layer[1, :, :, active_dev] = v
        if narrow:
            if score is not None:
                ranking = score(layer, q, active, active[cand_local], kv_layer)
            chosen = selector.select(ranking, keep, layer)
            keep_mask = ~is_candidate[active]
            keep_mask[cand_local[chosen]] = True
            keep_local = keep_mask.nonzero().squeeze(1)
            out.selections[layer] = active[cand_local[chosen]]
        if keep_local is not None:
            kl = keep_local.to(device)
            active, hidden, q = active[keep_local], hidden[:, kl], q[:, :, kl]
            mask = None
        if mask is None:
            mask = RowMask.build(positions[active.to(device)], positions)
        if observe is not None:
            observe(layer, q, active, kv_layer, mask)
        hidden = adapter.attend(layer, hidden, q, kv_layer[0], kv_layer[1], mask=mask)
    out.logits = adapter.logits(hidden[:, -1:])[0, 0]
    out.final_rows = active
    return out


def check_schedule(ratio: float, check_layers: tuple[int, ...], schedule: tuple[float, ...] | None,
                   num_candidates: int, num_layers: int) -> tuple[CheckLayer, ...]:
    """Keep counts per check layer: ``schedule`` gives the fraction of candidates kept after each check layer
    (non-increasing); by default it narrows linearly from ``2 * ratio`` at the first to ``ratio`` at the last
    (gradual filtering; a single check layer keeps ``ratio``). Check layers past the model's depth are dropped."""
    layers = tuple(sorted({int(x) for x in check_layers if 0 <= int(x) < num_layers}))
    if not layers:
        return ()
    if schedule is None:
        k = len(layers)
        schedule = tuple(ratio * (2.0 - i / (k - 1)) if k > 1 else ratio for i in range(k))
    elif len(schedule) != len(check_layers):
        raise ConfigError(f"schedule has {len(schedule)} fractions for {len(check_layers)} check layers")
    else:
        schedule = tuple(f for layer, f in sorted(zip(check_layers, schedule)) if 0 <= layer < num_layers)
    checks = []
    previous = num_candidates
    for layer, frac in zip(layers, schedule):
        keep = min(previous, round(min(1.0, max(0.0, frac)) * num_candidates))
        checks.append(CheckLayer(layer, keep))
        previous = keep
    return tuple(checks)


__all__ = [
    "DEVIATIONS",
    "SELECTORS",
    "CheckLayer",
    "HighDeviationSelector",
    "RandomSelector",
    "Scorer",
    "SelectiveOutput",
    "Selector",
    "check_schedule",
    "make_selector",
    "select_high_deviation",
    "selective_prefill",
]
