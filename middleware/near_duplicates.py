"""Near-duplicate chunks (KVShare): find a stored chunk whose tokens differ from a new one by edits, align them.

``NearDuplicateIndex`` keeps a MinHash signature per stored chunk (over shingles of ``shingle`` consecutive
token ids) in LSH bands, so a chunk that misses can find candidates whose estimated Jaccard similarity of
shingle sets is at least a threshold, within the namespaces the caller may read (a tenant never finds
another tenant's chunk). ``align_tokens`` gives, for every token of the new chunk, the token of the old one
it can reuse (equal runs of the longest-matching-block alignment) or -1 (inserted or replaced: computed).

Signatures use ``h(x) = (a * x + b) mod (2^31 - 1)`` over shingle hashes below 2^31, so every product fits in
int64 and numpy computes a chunk's signature in one vectorised step.
"""
from __future__ import annotations

import difflib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ragkv.kvstore.chunk import key_namespace

_PRIME = (1 << 31) - 1


@dataclass(frozen=True)
class Alignment:
    """``source[j]``: the index in the old chunk whose KV row new token ``j`` reuses, or -1 (computed)."""

    source: tuple[int, ...]

    @property
    def kept(self) -> int:
        return sum(1 for i in self.source if i >= 0)

    @property
    def reused_fraction(self) -> float:
        """Share of the new chunk's tokens that reuse an old row (1.0 for an empty chunk)."""
        return self.kept / len(self.source) if self.source else 1.0

    def edited(self) -> list[int]:
        """New-token indices that must be computed (inserted or replaced)."""
        return [j for j, i in enumerate(self.source) if i < 0]


def align_tokens(old: Sequence[int], new: Sequence[int]) -> Alignment:
    """Align ``new`` to ``old`` by matching blocks (no popularity heuristic: repeated tokens align too)."""
    source = [-1] * len(new)
    matcher = difflib.SequenceMatcher(None, list(old), list(new), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for offset in range(j2 - j1):
                source[j1 + offset] = i1 + offset
    return Alignment(tuple(source))


def shingle_hashes(tokens: Sequence[int], shingle: int) -> np.ndarray:
    """Hashes below 2^31 of every run of ``shingle`` consecutive tokens (the whole chunk when shorter)."""
    ids = np.asarray(list(tokens), dtype=np.int64) % _PRIME
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    width = min(shingle, ids.size)
    runs = np.lib.stride_tricks.sliding_window_view(ids, width)  # [S, width]
    h = np.zeros(runs.shape[0], dtype=np.int64)
    for column in range(width):  # polynomial hash mod p; every intermediate < 2^62
        h = (h * 1_000_003 + runs[:, column]) % _PRIME
    return np.unique(h)


class NearDuplicateIndex:
    """MinHash + LSH over stored chunks' token ids; thread-safe. ``threshold``: the least estimated Jaccard
    similarity a candidate must have."""

    def __init__(self, num_perm: int = 64, bands: int = 16, shingle: int = 4, threshold: float = 0.5,
                 seed: int = 0) -> None:
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, _PRIME, size=num_perm, dtype=np.int64)
        self._b = rng.integers(0, _PRIME, size=num_perm, dtype=np.int64)
        self.bands = bands
        self.rows = num_perm // bands
        self.shingle = shingle
        self.threshold = threshold
        self._signatures: dict[str, np.ndarray] = {}
        self._buckets: dict[tuple[int, bytes], set[str]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._signatures)

    def signature(self, tokens: Sequence[int]) -> np.ndarray:
        hashes = shingle_hashes(tokens, self.shingle)
        if hashes.size == 0:
            return np.full(self._a.size, _PRIME, dtype=np.int64)
        return ((self._a[:, None] * hashes[None, :] + self._b[:, None]) % _PRIME).min(axis=1)

    def _bands_of(self, signature: np.ndarray) -> list[tuple[int, bytes]]:
        return [(band, signature[band * self.rows:(band + 1) * self.rows].tobytes()) for band in range(self.bands)]

    def add(self, key: str, tokens: Sequence[int]) -> None:
        signature = self.signature(tokens)
        with self._lock:
            self._remove(key)
            self._signatures[key] = signature
            for band in self._bands_of(signature):
                self._buckets.setdefault(band, set()).add(key)

    def _remove(self, key: str) -> None:
        signature = self._signatures.pop(key, None)
        if signature is None:
            return
        for band in self._bands_of(signature):
            bucket = self._buckets.get(band)
            if bucket is not None:
                bucket.discard(key)
                if not bucket:
                    del self._buckets[band]

    def remove(self, key: str) -> None:
        with self._lock:
            self._remove(key)

    def candidates(self, tokens: Sequence[int], namespaces: Iterable[str], limit: int = 4
                   ) -> list[tuple[str, float]]:
        """Up to ``limit`` (key, estimated similarity) in ``namespaces``, at least ``threshold``, best first."""
        allowed = set(namespaces)
        signature = self.signature(tokens)
        with self._lock:
            found = {key for band in self._bands_of(signature) for key in self._buckets.get(band, ())}
            scored = [(key, float(np.mean(self._signatures[key] == signature))) for key in found
                      if key_namespace(key) in allowed]
        scored = [(k, s) for k, s in scored if s >= self.threshold]
        scored.sort(key=lambda item: (-item[1], item[0]))
        return scored[:limit]


__all__ = ["Alignment", "NearDuplicateIndex", "align_tokens", "shingle_hashes"]
