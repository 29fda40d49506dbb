"""Per-tier statistics: counters and log2 latency histograms, thread-safe."""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_BUCKETS = 24  # bucket i holds latencies in [2^i, 2^(i+1)) microseconds; the last is open-ended


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.total_s = 0.0
        self.count = 0

    def add(self, seconds: float) -> None:
        us = max(seconds * 1e6, 1.0)
        self.counts[min(int(math.log2(us)), _BUCKETS - 1)] += 1
        self.total_s += seconds
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound (seconds) of the bucket holding quantile ``q``."""
        if self.count == 0:
            return None
        target = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= target:
                return (2 ** (i + 1)) / 1e6
        return (2 ** _BUCKETS) / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean_ms": (self.total_s / self.count * 1e3) if self.count else None,
            "p50_ms_le": _ms(self.quantile(0.5)),
            "p99_ms_le": _ms(self.quantile(0.99)),
            "buckets_us_log2": list(self.counts),
        }


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


class TierStats:
    """Counters a tier keeps: hits, misses, puts, deletes, evictions, errors, bytes in/out, latencies."""

    COUNTERS = ("hits", "misses", "puts", "deletes", "evictions", "errors", "corrupt", "expired",
                "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.latency = {"get": LatencyHistogram(), "put": LatencyHistogram()}

    def add(self, **increments: int) -> None:
        with self._lock:
            for name, n in increments.items():
                self.counters[name] += n

    @contextmanager
    def timed(self, op: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.latency[op].add(elapsed)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lookups = self.counters["hits"] + self.counters["misses"]
            return {
                **self.counters,
                "hit_rate": (self.counters["hits"] / lookups) if lookups else None,
                "latency": {op: h.to_dict() for op, h in self.latency.items()},
            }
