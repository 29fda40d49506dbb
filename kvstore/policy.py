"""Eviction policies (pluggable, LRU by default) and retry back-off strategies for network tiers."""
from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
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
