"""Service metrics: request counters and latency histograms, TTFTs by cache state, Prometheus text.

Why hand-rolled: a dozen counters do not justify a dependency, and every label set here is bounded by
construction (route templates, never raw paths; methods and status codes; tier names; three cache states),
so the metrics cannot grow with traffic. Recent TTFTs live in a fixed-size ring for the status page.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECENT_TTFTS = 120
_METHODS = {"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"}
TENANT_COUNTERS = ("answers", "documents", "document_hits", "chunks_computed", "chunk_bytes_received",
                   "chunk_bytes_sent")


class Histogram:
    """Cumulative-bucket histogram in seconds (Prometheus semantics)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, c in zip([*map(_fmt_float, self.buckets), "+Inf"], self.counts):
            running += c
            out.append((bound, running))
        return out


@dataclass(frozen=True)
class TtftSample:
    at: float  # epoch seconds
    ttft_ms: float
    state: str  # "warm" (every document hit) | "cold" (none) | "mixed" | "none" (no documents)
    strategy: str
    documents: int


def cache_state(hits: Iterable[bool]) -> str:
    flags = list(hits)
    if not flags:
        return "none"
    if all(flags):
        return "warm"
    return "cold" if not any(flags) else "mixed"


class Metrics:
    """Thread-safe; every method is cheap enough for the request path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_at = time.time()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.documents: dict[tuple[str, str], int] = {}  # (outcome, tier) -> count
        self.chunk_bytes = {"sent": 0, "received": 0}
        self.answers = 0
        self.warmed = {"computed": 0, "already_cached": 0}
        self.recent: deque[TtftSample] = deque(maxlen=RECENT_TTFTS)
        # per tenant (bounded by the keys file): answers, document hits, chunks warmed, chunk bytes
        self.tenants: dict[str, dict[str, int]] = {}

    def _tenant(self, name: str | None) -> dict[str, int] | None:
        if name is None:
            return None
        return self.tenants.setdefault(name, dict.fromkeys(TENANT_COUNTERS, 0))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "OTHER"
        with self._lock:
            key = (method, route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.durations.setdefault(route, Histogram()).observe(seconds)

    def observe_answer(self, ttft_s: float, strategy: str, hits: Sequence[bool], tiers: Sequence[str | None],
                       tenant: str | None = None) -> None:
        state = cache_state(hits)
        with self._lock:
            self.answers += 1
            per = self._tenant(tenant)
            if per is not None:
                per["answers"] += 1
                per["document_hits"] += sum(1 for h in hits if h)
                per["documents"] += len(hits)
            self.ttft.setdefault(state, Histogram()).observe(ttft_s)
            for hit, tier in zip(hits, tiers):
                key = ("hit" if hit else "miss", (tier or "none") if hit else "none")
                self.documents[key] = self.documents.get(key, 0) + 1
            self.recent.append(TtftSample(time.time(), ttft_s * 1e3, state, strategy, len(hits)))

    def observe_warm(self, computed: int, already_cached: int, tenant: str | None = None) -> None:
        with self._lock:
            self.warmed["computed"] += computed
            self.warmed["already_cached"] += already_cached
            per = self._tenant(tenant)
            if per is not None:
                per["chunks_computed"] += computed

    def add_chunk_bytes(self, direction: str, n: int, tenant: str | None = None) -> None:
        with self._lock:
            self.chunk_bytes[direction] += n
            per = self._tenant(tenant)
            if per is not None:
                per[f"chunk_bytes_{direction}"] += n

    def tenant_snapshot(self, name: str | None) -> dict[str, dict[str, int]]:
        """Counters of tenant ``name`` (or of every tenant for None), by tenant name."""
        with self._lock:
            if name is not None:
                return {name: dict(self.tenants.get(name, dict.fromkeys(TENANT_COUNTERS, 0)))}
            return {n: dict(c) for n, c in self.tenants.items()}

    # -- views --------------------------------------------------------------------------------------------------
    def recent_ttfts(self) -> list[TtftSample]:
        with self._lock:
            return list(self.recent)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            hits = sum(n for (outcome, _), n in self.documents.items() if outcome == "hit")
            total = sum(self.documents.values())
            by_tier: dict[str, int] = {}
            for (outcome, tier), n in self.documents.items():
                if outcome == "hit":
                    by_tier[tier] = by_tier.get(tier, 0) + n
            ttft = {state: {"count": h.count, "mean_ms": h.sum / h.count * 1e3 if h.count else None}
                    for state, h in self.ttft.items()}
            return {
                "uptime_s": time.time() - self.started_at,
                "requests": sum(self.requests.values()),
                "answers": self.answers,
                "document_hit_rate": hits / total if total else None,
                "document_hits_by_tier": by_tier,
                "documents": total,
                "ttft": ttft,
                "recent_ttft_ms": [round(s.ttft_ms, 3) for s in self.recent],
                "chunk_bytes": dict(self.chunk_bytes),
                "warmed": dict(self.warmed),
            }

    def render_prometheus(self, store_stats: Mapping[str, Any], extra_gauges: Mapping[str, float] = {}) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        def histogram(name: str, label: str, hists: Mapping[str, Histogram]) -> None:
            for value, h in sorted(hists.items()):
                for le, n in h.cumulative():
                    lines.append(f"{name}_bucket{_labels({label: value, 'le': le})} {n}")
                lines.append(f"{name}_sum{_labels({label: value})} {_fmt_float(h.sum)}")
                lines.append(f"{name}_count{_labels({label: value})} {h.count}")

        with self._lock:
            family("ragkv_http_requests_total", "counter", "HTTP requests by method, route template and status.")
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f"ragkv_http_requests_total{_labels({'method': method, 'route': route, 'status': status})} {n}")
            family("ragkv_http_request_duration_seconds", "histogram", "HTTP request latency by route template.")
            histogram("ragkv_http_request_duration_seconds", "route", self.durations)
            family("ragkv_ttft_seconds", "histogram",
                   "Time to first token of answers, by cache state of their documents (warm, cold, mixed, none).")
            histogram("ragkv_ttft_seconds", "cache", self.ttft)
            family("ragkv_documents_total", "counter", "Documents of answered requests, by outcome and tier.")
            for (outcome, tier), n in sorted(self.documents.items()):
                lines.append(f"ragkv_documents_total{_labels({'outcome': outcome, 'tier': tier})} {n}")
            family("ragkv_chunk_bytes_total", "counter", "Container bytes moved by the chunk endpoints.")
            for direction, n in sorted(self.chunk_bytes.items()):
                lines.append(f"ragkv_chunk_bytes_total{_labels({'direction': direction})} {n}")
            family("ragkv_warmed_chunks_total", "counter", "Chunks submitted for warming, by outcome.")
            for outcome, n in sorted(self.warmed.items()):
                lines.append(f"ragkv_warmed_chunks_total{_labels({'outcome': outcome})} {n}")
        family("ragkv_store_lookups_total", "counter", "Store lookups, by result.")
        lines.append(f'ragkv_store_lookups_total{{result="hit"}} {int(store_stats.get("hits", 0))}')
        lines.append(f'ragkv_store_lookups_total{{result="miss"}} {int(store_stats.get("misses", 0))}')
        family("ragkv_store_promotions_total", "counter", "Hits in a slower tier copied into faster tiers.")
        lines.append(f"ragkv_store_promotions_total {int(store_stats.get('promotions', 0))}")
        tiers: Mapping[str, Any] = store_stats.get("tiers", {})
        family("ragkv_tier_used_bytes", "gauge", "Bytes held by each tier.")
        for name, t in tiers.items():
            lines.append(f"ragkv_tier_used_bytes{_labels({'tier': name})} {int(t.get('used_bytes') or 0)}")
        family("ragkv_tier_capacity_bytes", "gauge", "Byte capacity of each tier (absent when unbounded).")
        for name, t in tiers.items():
            if t.get("capacity_bytes") is not None:
                lines.append(f"ragkv_tier_capacity_bytes{_labels({'tier': name})} {int(t['capacity_bytes'])}")
        family("ragkv_tier_operations_total", "counter", "Tier hits, misses, puts, evictions and errors.")
        for name, t in tiers.items():
            for op in ("hits", "misses", "puts", "deletes", "evictions", "errors", "corrupt"):
                if op in t:
                    lines.append(f"ragkv_tier_operations_total{_labels({'tier': name, 'op': op})} {int(t[op])}")
        for name, value in extra_gauges.items():
            family(name, "gauge", name.replace("_", " "))
            lines.append(f"{name} {_fmt_float(float(value))}")
        return "\n".join(lines) + "\n"


def _fmt_float(v: float) -> str:
    return "NaN" if math.isnan(v) else repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


__all__ = ["LATENCY_BUCKETS_S", "Histogram", "Metrics", "TtftSample", "cache_state"]
