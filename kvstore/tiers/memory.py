"""Shared in-memory tier logic for ``host`` and ``device``: decoded tensors, byte capacity, pluggable eviction."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ragkv.kvstore.chunk import ChunkKV, check_key
from ragkv.kvstore.errors import ConfigError
from ragkv.kvstore.policy import fair_victims, make_policy
from ragkv.kvstore.tiers.base import Tier, TierConfig, expiry_time


@dataclass
class _Entry:
    chunk: ChunkKV
    nbytes: int
    expires_at: float | None


class MemoryTier(Tier):
    """Holds ``ChunkKV`` objects on ``self.device``. ``get`` returns the stored tensor itself (zero-copy):
    callers must treat it as read-only and clone before mutating in place."""

    device: torch.device = torch.device("cpu")

    def __init__(self, config: TierConfig) -> None:
        super().__init__(config)
        self._entries: dict[str, _Entry] = {}
        self._policy = make_policy(config.eviction)
        self._used = 0
        self._sizes: dict[str, int] = {}  # key -> nbytes, for fair eviction between namespaces

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._used -= entry.nbytes
        del self._sizes[key]
        self._policy.remove(key)

    def _live_entry(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at is not None and time.time() >= entry.expires_at:
            self._drop(key)
            self.stats.add(expired=1)
            return None
        return entry

    def get(self, key: str) -> ChunkKV | None:
        check_key(key)
        with self.stats.timed("get"), self._lock:
            entry = self._live_entry(key)
            if entry is None:
                self.stats.add(misses=1)
                return None
            self._policy.touch(key)
            self.stats.add(hits=1, bytes_out=entry.nbytes)
            return entry.chunk

    def put(self, key: str, chunk: ChunkKV, ttl_s: float | None = None) -> None:
        check_key(key)
        expires_at = expiry_time(ttl_s)
        kv = chunk.kv
        if kv.device != self.device:
            kv = kv.to(self.device, non_blocking=False)
            chunk = ChunkKV(kv, chunk.meta)
        nbytes = chunk.nbytes
        cap = self.config.capacity_bytes
        with self.stats.timed("put"), self._lock:
            if key in self._entries:
                self._drop(key)  # the old value goes whether or not the new one fits: never serve it again
            if cap is not None and nbytes > cap:
                # Larger than the whole tier: not cached here (slower tiers still take it).
                self.stats.add(evictions=1)
                return
            self._make_room(nbytes)
            if cap is not None and self._used + nbytes > cap:
                self.stats.add(evictions=1)  # everything left is pinned: refuse rather than overflow
                return
            self._entries[key] = _Entry(chunk, nbytes, expires_at)
            self._sizes[key] = nbytes
            self._policy.insert(key)
            self._used += nbytes
            self.stats.add(puts=1, bytes_in=nbytes)

    def _make_room(self, nbytes: int) -> None:
        cap = self.config.capacity_bytes
        if cap is None or self._used + nbytes <= cap:
            return
        for victim in fair_victims(self._policy, self._sizes, self._pinned, self._used + nbytes - cap):
            self._drop(victim)
            self.stats.add(evictions=1)

    def namespace_usage(self, namespace: str) -> tuple[int, int]:
        prefix = namespace + ":"
        with self._lock:
            used = sum(n for k, n in self._sizes.items() if k.startswith(prefix))
            pinned = sum(self._sizes.get(k, 0) for k in self._pinned if k.startswith(prefix))
        return used, pinned

    def expiry(self, key: str) -> float | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.expires_at

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key)
            self.stats.add(deletes=1)
            return True

    def contains(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return self._live_entry(key) is not None

    def keys(self, namespace: str | None = None) -> Iterator[str]:
        with self._lock:
            keys = list(self._entries)
        prefix = None if namespace is None else namespace + ":"
        return iter([k for k in keys if prefix is None or k.startswith(prefix)])

    def used_bytes(self) -> int:
        return self._used

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self._used = 0


def check_device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid torch device {name!r}: {exc}") from exc
