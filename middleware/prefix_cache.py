"""A bounded in-process cache of exact token prefixes: system prefixes and whole prompts.

Exact-prefix reuse keys an entry by every token before it, so a stream of new queries would create one
entry per query. These entries therefore live here, bounded by an entry count and a byte budget with LRU
eviction, and never in the chunk store, which they could otherwise flood. A whole-prompt entry also keeps
the last token's logits, so a repeated identical prompt needs no compute at all.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ragkv.kvstore.errors import ConfigError


@dataclass(frozen=True)
class PrefixCacheConfig:
    max_entries: int = 64
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.max_entries < 0 or self.max_bytes < 0:
            raise ConfigError(f"prefix cache bounds must be >= 0, got {self.max_entries} entries, {self.max_bytes} B")


@dataclass(frozen=True)
class PrefixEntry:
    kv: torch.Tensor  # [L, 2, 1, H, P, D]
    logits: torch.Tensor | None  # [V] float32: the last prefix token's logits (whole-prompt entries)

    @property
    def length(self) -> int:
        return self.kv.shape[4]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.logits is None else self.logits.numel() * self.logits.element_size()
        return self.kv.numel() * self.kv.element_size() + extra


def prefix_key(token_ids: Sequence[int], namespace: str) -> bytes:
    """Entries belong to one tenant: the namespace is part of the key, so no tenant reuses another's prompt."""
    h = hashlib.blake2b(digest_size=20)
    h.update(namespace.encode() + b"\x00")
    h.update(torch.tensor(list(token_ids), dtype=torch.int32).numpy().astype("<i4").tobytes())
    return h.digest()


class PrefixCache:
    """LRU over exact token prefixes of one model (an engine owns one per adapter), per tenant namespace."""

    def __init__(self, config: PrefixCacheConfig = PrefixCacheConfig()) -> None:
        self.config = config
        self._entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def get(self, token_ids: Sequence[int], *, namespace: str, need_logits: bool = False) -> PrefixEntry | None:
        key = prefix_key(token_ids, namespace)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (need_logits and entry.logits is None) or entry.length != len(token_ids):
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def longest(self, token_ids: Sequence[int], boundaries: Sequence[int], *, namespace: str
                ) -> tuple[int, PrefixEntry] | None:
        """The longest cached prefix ``token_ids[:b]`` among ``boundaries`` (a full-length match needs logits)."""
        for b in sorted(set(boundaries), reverse=True):
            if b <= 0:
                continue
            entry = self.get(token_ids[:b], namespace=namespace, need_logits=b == len(token_ids))
            if entry is not None:
                return b, entry
        return None

    def put(self, token_ids: Sequence[int], kv: torch.Tensor, logits: torch.Tensor | None = None, *,
            namespace: str) -> bool:
        """Store a prefix; returns False when it is larger than the whole budget."""
        entry = PrefixEntry(kv.detach(), None if logits is None else logits.detach().float())
        if entry.length != len(token_ids):
            raise ValueError(f"prefix KV holds {entry.length} tokens for {len(token_ids)} token ids")
        if self.config.max_entries == 0 or entry.nbytes > self.config.max_bytes:
            return False
        key = prefix_key(token_ids, namespace)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
                if entry.logits is None and old.logits is not None:
                    entry = old  # keep the richer entry
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while len(self._entries) > self.config.max_entries or self._bytes > self.config.max_bytes:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= victim.nbytes
                self.evictions += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self._bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


__all__ = ["PrefixCache", "PrefixCacheConfig", "PrefixEntry", "prefix_key"]
