"""Near-duplicate reuse in the engine: on a miss, repair a stored chunk the new one was edited from (KVShare).

``NearDuplicateReuse`` keeps the ``NearDuplicateIndex`` of the chunks this engine stores or finds stored
(warm, misses stored by a request, ``index_store`` for what was stored before the process started), and on
a miss:

1. asks the index for candidates in the namespaces the request may read (estimated shingle similarity of at
   least ``similarity``), best first;
2. reads the candidate from the store (gone: forgotten; another model's: skipped) and aligns the token ids;
3. if at least ``min_reused`` of the new chunk's tokens reuse an old row, repairs it (``repair_chunk``: edits,
   ``neighbours`` after each edit, and a ``ratio`` budget chosen by K deviation recomputed) and returns it.

The engine stores the repaired chunk under the new chunk's own key, so the next request is an exact hit.
Off by default (``enabled``): a repaired chunk is an approximation of the computed one, like blend's reuse.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ragkv.kvstore.chunk import ChunkKV, ChunkMeta
from ragkv.kvstore.container import read_header
from ragkv.kvstore.errors import CorruptEntry, RagKVError
from ragkv.middleware.abstracts import is_abstract_key
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.chunk_repair import repair_chunk
from ragkv.middleware.near_duplicates import NearDuplicateIndex, align_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NearDuplicateConfig:
    enabled: bool = False
    similarity: float = 0.5  # least estimated Jaccard similarity of 4-token shingle sets for a candidate
    min_reused: float = 0.8  # least share of the new chunk's tokens that reuse an old row
    neighbours: int = 2  # kept tokens recomputed after each edit
    ratio: float = 0.1  # share of the other kept tokens recomputed, chosen by K deviation at check_layers
    check_layers: tuple[int, ...] = (2, 3)
    candidates: int = 3  # candidates tried per miss


@dataclass
class NearDuplicateHit:
    chunk: ChunkKV  # the repaired chunk, with the new chunk's metadata
    source_key: str  # the stored chunk it was repaired from
    repaired_tokens: int  # tokens computed in the deepest layer
    reused_fraction: float  # share of its tokens that reused a stored row


class NearDuplicateReuse:
    def __init__(self, adapter: ModelAdapter, store: object, make_meta: Callable[[Sequence[int]], ChunkMeta],
                 config: NearDuplicateConfig = NearDuplicateConfig()) -> None:
        self.adapter = adapter
        self.store = store
        self.make_meta = make_meta
        self.config = config
        self.index = NearDuplicateIndex(threshold=config.similarity)
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def observe(self, key: str, token_ids: Sequence[int]) -> None:
        """``key`` now holds a chunk of ``token_ids``."""
        if self.enabled:
            self.index.add(key, token_ids)

    def index_store(self, namespaces: Iterable[str] | None = None) -> int:
        """Index the chunks already stored (in ``namespaces``, or all) from their headers; returns how many."""
        store = self.store
        count = 0
        for namespace in (None,) if namespaces is None else namespaces:
            for key in store.keys(namespace):  # type: ignore[attr-defined]
                if is_abstract_key(key):
                    continue
                blob = store.get_blob(key)  # type: ignore[attr-defined]
                if blob is None:
                    continue
                try:
                    meta = read_header(blob, store.limits, key).meta  # type: ignore[attr-defined]
                except CorruptEntry:
                    continue
                if meta.fingerprint == str(self.adapter.fingerprint):
                    self.index.add(key, meta.token_ids)
                    count += 1
        return count

    def find(self, token_ids: Sequence[int], namespaces: Iterable[str]) -> NearDuplicateHit | None:
        """A repaired chunk for ``token_ids`` from a readable near-duplicate, or None."""
        if not self.enabled or not token_ids:
            return None
        c = self.config
        fingerprint = str(self.adapter.fingerprint)
        for key, _ in self.index.candidates(token_ids, namespaces, limit=c.candidates):
            try:
                old = self.store.get(key)  # type: ignore[attr-defined]
            except RagKVError as exc:
                log.debug("near-duplicate candidate %s unreadable: %s", key, exc)
                continue
            if old is None:
                self.index.remove(key)
                continue
            if old.meta.fingerprint != fingerprint:
                continue
            alignment = align_tokens(old.meta.token_ids, token_ids)
            if alignment.reused_fraction < c.min_reused:
                continue
            repaired = repair_chunk(self.adapter, old.kv, old.meta.position, list(token_ids), alignment,
                                    neighbours=c.neighbours, ratio=c.ratio, check_layers=c.check_layers)
            self.hits += 1
            return NearDuplicateHit(ChunkKV(repaired.kv, self.make_meta(token_ids)), key, repaired.recomputed,
                                    alignment.reused_fraction)
        return None


__all__ = ["NearDuplicateConfig", "NearDuplicateHit", "NearDuplicateReuse"]
