"""Eviction policies (pluggable, LRU by default) and retry back-off strategies for network tiers."""
from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import ClassVar


class EvictionPolicy:
    """Tracks keys and proposes victims. Not thread-safe: the owning tier holds its lock."""

    name: ClassVar[str] = ""

    def touch(self, key: str) -> None: ...
    def insert(self, key: str) -> None: ...
    def remove(self, key: str) -> None: ...
    def victims(self) -> Iterator[str]:
        """Keys in eviction order (first = evict first)."""
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def insert(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[str]:
        return iter(list(self._order))


class FIFOPolicy(LRUPolicy):
    """Evicts in insertion order; reads do not refresh."""

    name = "fifo"

    def touch(self, key: str) -> None:
        pass


def fair_victims(policy: EvictionPolicy, sizes: Mapping[str, int], pinned: AbstractSet[str], need: int,
                 spare: str | None = None) -> list[str]:
    """Victims that free at least ``need`` bytes, fair between namespaces (the part of a key before ``:``).

    Each victim is the policy's next one from the namespace that holds the most unpinned bytes at that
    moment, so a tenant filling a shared tier evicts its own entries once it holds more than the others
    and can never push another tenant below its own share. Pinned keys and ``spare`` are never chosen.
    One pass over the policy order, then a heap over namespaces. Fewer bytes than ``need`` when only
    pinned entries are left."""
    queues: dict[str, list[str]] = {}
    held: dict[str, int] = {}
    for key in policy.victims():
        if key in pinned or key == spare or key not in sizes:
            continue
        ns = key.partition(":")[0]
        queues.setdefault(ns, []).append(key)
        held[ns] = held.get(ns, 0) + sizes[key]
    heap = [(-b, ns) for ns, b in held.items()]
    heapq.heapify(heap)
    cursor = dict.fromkeys(queues, 0)
    chosen: list[str] = []
    freed = 0
    while freed < need and heap:
        _, ns = heapq.heappop(heap)
        key = queues[ns][cursor[ns]]
        cursor[ns] += 1
        chosen.append(key)
        freed += sizes[key]
        held[ns] -= sizes[key]
        if cursor[ns] < len(queues[ns]):
            heapq.heappush(heap, (-held[ns], ns))
    return chosen


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRUPolicy, "fifo": FIFOPolicy}


def make_policy(name: str) -> EvictionPolicy:
    from ragkv.kvstore.errors import ConfigError

    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; allowed: {sorted(POLICIES)}") from None


class ExponentialBackoff:
    """Back-off for retries and circuit breakers: base_s * 2^attempt, capped, with full jitter."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0, jitter: bool = True) -> None:
        self.base_s, self.cap_s, self.jitter = base_s, cap_s, jitter

    def delay_s(self, attempt: int) -> float:
        d = min(self.cap_s, self.base_s * (2 ** max(attempt, 0)))
        return random.uniform(d / 2, d) if self.jitter else d


class ConstantBackoff:
    def __init__(self, delay_s: float = 1.0) -> None:
        self._delay_s = delay_s

    def delay_s(self, attempt: int) -> float:
        return self._delay_s
