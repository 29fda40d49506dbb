"""Service metrics: request counters and latency histograms, TTFTs by cache state, answers by tenant and
endpoint (counts, TTFT including the wait for the model, decode tokens/s), the scheduler's queue depths and
decode batch sizes, Prometheus text.

Why hand-rolled: a dozen counters do not justify a dependency, and every label set here is bounded by
construction (route templates, never raw paths; methods and status codes; tier names; three cache states;
tenants from the keys file; two answering endpoints), so the metrics cannot grow with traffic. Recent TTFTs
live in a fixed-size ring for the status page.
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
TOKENS_PER_S_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RECENT_TTFTS = 120
_METHODS = {"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"}
TENANT_COUNTERS = ("answers", "documents", "document_hits", "chunks_computed", "chunk_bytes_received",
                   "chunk_bytes_sent")


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics); seconds unless other buckets are given."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.observe_many(value, 1)

    def observe_many(self, value: float, n: int) -> None:
        """``n`` observations of ``value``."""
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += n
                break
        else:
            self.counts[-1] += n
        self.sum += value * n
        self.count += n

    def add(self, other: Histogram) -> None:
        """Fold ``other`` (same buckets) into this one."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum
        self.count += other.count

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
        # per (tenant, endpoint): answers, TTFT from joining the model queue, decode tokens/s
        self.answers_by: dict[tuple[str, str], int] = {}
        self.answer_ttft: dict[tuple[str, str], Histogram] = {}
        self.answer_rate: dict[tuple[str, str], Histogram] = {}

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
                       tenant: str | None = None, *, endpoint: str = "", queue_s: float = 0.0,
                       tokens_per_s: float | None = None) -> None:
        state = cache_state(hits)
        by = (tenant or "", endpoint)
        with self._lock:
            self.answers += 1
            self.answers_by[by] = self.answers_by.get(by, 0) + 1
            self.answer_ttft.setdefault(by, Histogram()).observe(queue_s + ttft_s)
            if tokens_per_s is not None:
                self.answer_rate.setdefault(by, Histogram(TOKENS_PER_S_BUCKETS)).observe(tokens_per_s)
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

    def render_prometheus(self, store_stats: Mapping[str, Any], extra_gauges: Mapping[str, float] = {},
                          scheduler: Any = None, per_tenant: bool = False) -> str:
        """The Prometheus text exposition format (version 0.0.4); ``scheduler`` adds its queue and batch figures.
        Answer series carry a ``tenant`` label only with ``per_tenant`` (an admin's scrape); otherwise they are
        summed over tenants, by endpoint."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        def histogram(name: str, label: str | tuple[str, ...], hists: Mapping[Any, Histogram]) -> None:
            names = (label,) if isinstance(label, str) else label
            for value, h in sorted(hists.items()):
                labels = dict(zip(names, (value,) if isinstance(label, str) else value))
                for le, n in h.cumulative():
                    lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {n}")
                lines.append(f"{name}_sum{_labels(labels)} {_fmt_float(h.sum)}")
                lines.append(f"{name}_count{_labels(labels)} {h.count}")

        with self._lock:
            family("ragkv_http_requests_total", "counter", "HTTP requests by method, route template and status.")
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f"ragkv_http_requests_total{_labels({'method': method, 'route': route, 'status': status})} {n}")
            family("ragkv_http_request_duration_seconds", "histogram", "HTTP request latency by route template.")
            histogram("ragkv_http_request_duration_seconds", "route", self.durations)
            family("ragkv_ttft_seconds", "histogram",
                   "Time to first token of answers, by cache state of their documents (warm, cold, mixed, none).")
            histogram("ragkv_ttft_seconds", "cache", self.ttft)
            by = ("tenant", "endpoint") if per_tenant else ("endpoint",)
            family("ragkv_answers_total", "counter", f"Answers by {' and '.join(by)}.")
            for key, n in sorted(_by_endpoint(self.answers_by, per_tenant).items()):
                lines.append(f"ragkv_answers_total{_labels(dict(zip(by, key)))} {n}")
            family("ragkv_answer_ttft_seconds", "histogram", "Time to first token from joining the model queue.")
            histogram("ragkv_answer_ttft_seconds", by, _by_endpoint(self.answer_ttft, per_tenant))
            family("ragkv_answer_tokens_per_second", "histogram",
                   "Decode rate of answers (tokens after the first / their time).")
            histogram("ragkv_answer_tokens_per_second", by, _by_endpoint(self.answer_rate, per_tenant))
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
        if scheduler is not None:
            family("ragkv_scheduler_queue_depth", "gauge", "Jobs waiting for the model, by queue.")
            lines.append(f'ragkv_scheduler_queue_depth{{queue="generate"}} {scheduler.waiting}')
            lines.append(f'ragkv_scheduler_queue_depth{{queue="warm"}} {scheduler.warm_waiting}')
            family("ragkv_scheduler_batch_size", "gauge", "Sequences in the running decode batch.")
            lines.append(f"ragkv_scheduler_batch_size {scheduler.batch_size}")
            steps = Histogram(BATCH_SIZE_BUCKETS)
            for size, n in sorted(scheduler.batch_sizes.items()):
                steps.observe_many(size, n)
            family("ragkv_decode_batch_size", "histogram", "Sequences per batched decode step.")
            histogram("ragkv_decode_batch_size", (), {(): steps})
        for name, value in extra_gauges.items():
            family(name, "gauge", name.replace("_", " "))
            lines.append(f"{name} {_fmt_float(float(value))}")
        return "\n".join(lines) + "\n"


def _by_endpoint(series: Mapping[tuple[str, str], Any], per_tenant: bool) -> dict[tuple[str, ...], Any]:
    """Series keyed (tenant, endpoint) as they are, or summed over tenants and keyed (endpoint,)."""
    if per_tenant:
        return dict(series)
    out: dict[tuple[str, ...], Any] = {}
    for (_, endpoint), value in series.items():
        if isinstance(value, Histogram):
            out.setdefault((endpoint,), Histogram(value.buckets)).add(value)
        else:
            out[(endpoint,)] = out.get((endpoint,), 0) + value
    return out


def _fmt_float(v: float) -> str:
    return "NaN" if math.isnan(v) else repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


__all__ = ["BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS_S", "TOKENS_PER_S_BUCKETS", "Histogram", "Metrics", "TtftSample", "cache_state"]
