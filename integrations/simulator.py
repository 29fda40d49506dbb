"""Cache-sizing simulator: replay a request trace through the store's own placement and eviction code over
modelled tiers, and estimate hit rates, bytes moved and TTFT for a tier configuration ("how big should each
tier be?").

Modelled tiers: every tier of the spec becomes a host-memory tier (``HostTier``) with a capacity in *decoded*
bytes = the tier's capacity / its codec's size ratio, inside a real ``TieredStore`` (its write-through to every
tier, its ``promote`` into faster tiers, the tiers' fair LRU eviction). Each request is replayed in the
engine's order: every chunk is looked up first (a first-tier hit refreshes its place), then the chunks read
from slower tiers are promoted, then the missing ones are stored. The
chunks put there are zero-copy stand-ins: an expanded one-element tensor whose declared size is the chunk's
decoded KV size, so no bytes are allocated or moved. A Redis tier has no capacity unless one is given (the
real one evicts by Redis's own policy; here by LRU).

TTFT of a request (no queueing: requests are replayed one at a time):
``fixed + max(prompt_tokens * prompt_s_per_token, loads) + missing_tokens * compute_s_per_token``, where
``loads`` sums, over the chunks found in a slow tier, that tier's latency plus its decoded bytes times its
seconds per byte (loading overlaps the prompt's pass layer by layer, so the larger of the two counts), and
missing chunks are computed alone and written to every tier before the pass (``write_s_per_byte``). The costs come from ``SimCosts`` measured on this machine
for one model (``ragkv.integrations.sim_costs``).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ragkv.integrations.sim_trace import TraceRequest, store_key
from ragkv.kvstore import ChunkKV, ChunkMeta, ConfigError, TieredStore
from ragkv.kvstore.config import parse_spec
from ragkv.kvstore.tiers import HostConfig, HostTier, TierConfig, tier_class, tier_kinds

_STAND_IN = torch.zeros(1, dtype=torch.float64)
DECODED_KINDS = ("host", "device")  # tiers holding decoded tensors; the others hold encoded blobs  # every stand-in chunk is a view of this one element


@dataclass(frozen=True)
class SimCosts:
    """What one request's parts cost on a machine, for one model (seconds; bytes are decoded KV bytes)."""

    model: str
    kv_bytes_per_token: int
    fixed_s: float  # per request: prefix, first-token sampling, bookkeeping
    prompt_s_per_token: float  # the default strategy's pass over the prompt (cached chunks), per prompt token
    compute_s_per_token: float  # a missing chunk computed alone, per token
    load_s_per_byte: dict[str, float]  # per tier kind, reading and decoding a chunk
    load_latency_s: dict[str, float] = field(default_factory=dict)  # per tier kind, per chunk read
    size_ratio: dict[str, float] = field(default_factory=dict)  # per codec: encoded / decoded bytes (default 1)
    write_s_per_byte: dict[str, float] = field(default_factory=dict)  # per tier kind, storing a computed miss

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SimCosts:
        try:
            costs = cls(**data)
        except TypeError as exc:
            raise ConfigError(f"not a costs file: {exc}") from None
        numbers = [costs.kv_bytes_per_token, costs.fixed_s, costs.prompt_s_per_token, costs.compute_s_per_token,
                   *costs.load_s_per_byte.values(), *costs.load_latency_s.values(), *costs.size_ratio.values(),
                   *costs.write_s_per_byte.values()]
        if not all(type(x) in (int, float) and 0 <= x < 1e12 for x in numbers) or costs.kv_bytes_per_token < 1:
            raise ConfigError("costs must be non-negative numbers (and kv_bytes_per_token >= 1)")
        return costs

    @classmethod
    def load(cls, path: str | Path) -> SimCosts:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass(frozen=True)
class ModelledTier:
    kind: str
    codec: str
    capacity_bytes: int | None  # as configured (encoded bytes); None: unbounded


@dataclass
class SimResult:
    tiers: list[ModelledTier]
    lookups: int = 0
    hits: list[int] = field(default_factory=list)  # per tier: chunks found there first
    misses: int = 0
    bytes_read: list[int] = field(default_factory=list)  # per tier, encoded bytes served
    bytes_written: list[int] = field(default_factory=list)  # per tier, encoded bytes stored (misses, promotions)
    ttft_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ttft = sorted(self.ttft_s)
        return {
            "requests": len(ttft), "lookups": self.lookups,
            "tiers": tier_names(self.tiers),
            "hit_rate": {name: h / self.lookups for name, h in zip(tier_names(self.tiers), self.hits)},
            "hit_rate_total": sum(self.hits) / self.lookups, "miss_rate": self.misses / self.lookups,
            "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
            "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": _quantile(ttft, 0.5),
            "ttft_p99_s": _quantile(ttft, 0.99),
        }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def tier_names(tiers: Sequence[ModelledTier]) -> list[str]:
    """Each tier's kind, numbered from the second of a kind on (``disk``, ``disk2``), as the store names them."""
    names: list[str] = []
    for t in tiers:
        name, n = t.kind, 2
        while name in names:
            name, n = f"{t.kind}{n}", n + 1
        names.append(name)
    return names


def _kind_of(config: TierConfig) -> str:
    return next(k for k in tier_kinds() if tier_class(k).config_class is type(config))


def modelled_tiers(spec: str, sizes: dict[str, int] | None = None) -> list[ModelledTier]:
    """The spec's tiers, fastest first (``sizes``: capacity overrides by tier kind, in bytes)."""
    tiers = []
    for config in parse_spec(spec).tiers:
        kind = _kind_of(config)
        capacity = (sizes or {}).get(kind, config.capacity_bytes)
        tiers.append(ModelledTier(kind, config.codec, capacity))
    return tiers


class Simulator:
    """Replays traces over one tier configuration (a fresh modelled store per ``run``)."""

    def __init__(self, tiers: Sequence[ModelledTier], costs: SimCosts) -> None:
        self.tiers = list(tiers)
        self.costs = costs

    def _ratio(self, tier: ModelledTier) -> float:
        """Encoded over decoded bytes in ``tier`` (host and device tiers hold decoded tensors: 1)."""
        if tier.kind in DECODED_KINDS:
            return 1.0
        return self.costs.size_ratio.get(tier.codec, 1.0) or 1.0

    def _store(self) -> TieredStore:
        modelled = []
        for t in self.tiers:
            decoded = None if t.capacity_bytes is None else int(t.capacity_bytes / self._ratio(t))
            modelled.append(HostTier(HostConfig(capacity_bytes=decoded)))
        return TieredStore(modelled)

    def _stand_in(self, tokens: int) -> ChunkKV:
        width = -(-self.costs.kv_bytes_per_token // (2 * _STAND_IN.element_size()))  # rounded up: < 16 B/token over
        return ChunkKV(_STAND_IN.expand(1, 2, 1, tokens, width), ChunkMeta("simulated", (0,) * tokens))

    def run(self, trace: Sequence[TraceRequest]) -> SimResult:
        c = self.costs
        n = len(self.tiers)
        result = SimResult(self.tiers, hits=[0] * n, bytes_read=[0] * n, bytes_written=[0] * n)
        store = self._store()
        try:
            for request in trace:
                loads = computed = 0.0
                prompt_tokens = request.query_tokens
                slow_hits, missing = [], []
                for chunk_id, tokens in request.chunks:  # as the engine's loader: every chunk read first
                    prompt_tokens += tokens
                    key = store_key(request, chunk_id)
                    decoded = tokens * c.kv_bytes_per_token
                    result.lookups += 1
                    name = store.locate(key)
                    if name is None:
                        result.misses += 1
                        computed += tokens * c.compute_s_per_token + sum(
                            decoded * c.write_s_per_byte.get(t.kind, 0.0) for t in self.tiers)
                        missing.append((key, tokens))
                        continue
                    i = store.names.index(name)
                    result.hits[i] += 1
                    result.bytes_read[i] += int(decoded * self._ratio(self.tiers[i]))
                    if i == 0:
                        store.get(key)  # refreshes its place in the first tier's eviction order
                        continue
                    slow_hits.append((key, store.tiers[i].get(key), name))
                    for j in range(i):  # promoted into every faster tier
                        result.bytes_written[j] += int(decoded * self._ratio(self.tiers[j]))
                    kind = self.tiers[i].kind
                    loads += c.load_latency_s.get(kind, 0.0) + decoded * c.load_s_per_byte.get(kind, 0.0)
                for key, chunk, name in slow_hits:  # then chunks read from slow tiers are promoted
                    if chunk is not None:
                        store.promote(key, chunk, name)
                for key, tokens in missing:  # and the missing ones, computed, are stored
                    store.put(key, self._stand_in(tokens))
                    for i, t in enumerate(self.tiers):
                        result.bytes_written[i] += int(tokens * c.kv_bytes_per_token * self._ratio(t))
                result.ttft_s.append(c.fixed_s + max(prompt_tokens * c.prompt_s_per_token, loads) + computed)
        finally:
            store.close()
        return result


def sweep(trace: Sequence[TraceRequest], spec: str, costs: SimCosts, grid: dict[str, Sequence[int]]
          ) -> list[dict[str, Any]]:
    """One simulation per combination of tier sizes in ``grid`` (tier kind -> capacities in bytes)."""
    kinds = list(grid)
    rows = []
    for sizes in itertools.product(*(grid[k] for k in kinds)):
        chosen = dict(zip(kinds, sizes))
        summary = Simulator(modelled_tiers(spec, chosen), costs).run(trace).summary()
        rows.append({"sizes": chosen, **summary})
    return rows


__all__ = ["ModelledTier", "SimCosts", "SimResult", "Simulator", "modelled_tiers", "sweep", "tier_names"]
