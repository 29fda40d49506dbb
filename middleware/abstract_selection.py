"""Chunk abstracts at query time (LeoAM): leave out the retrieved chunks the query will hardly read, before
fetching them.

Writing: every chunk the engine stores (warm, a miss, a repaired near-duplicate) gets its abstract
(``ragkv.middleware.abstracts``) over the first ``layers`` layers, stored beside it with the lossless ``raw``
codec, and kept decoded in a bounded in-process cache (the fast tier), so a chunk can sit on disk or in Redis
while its abstract is read from memory.

Choosing (``choose``), for a prompt of at least ``min_chunks`` chunks that all have abstracts:

1. the query's rows are computed through the first ``layers`` layers over the prefix alone (the chunks are not
   fetched yet, so these are the query's rows without the documents: an approximation of the real ones), and
   rotated to the query's real position;
2. per scoring layer, query head and query row, each chunk's attention mass is bounded from above by its
   abstract: ``log T + scale * sum_c max(q_c kmin_c, q_c kmax_c)`` (``ChunkAbstract.log_mass_bound``);
3. a chunk's gap is how far its bound stays below the best chunk's bound, averaged over the scoring layers, query
   heads and query rows: ``mean over (l, h, r) of bound_c - max_c' bound_c'`` (<= 0). The average, because
   with the maximum every chunk tops at some (layer, head, row) and nothing is ever left out (measured on
   SmolLM2: every chunk of 12 prompts of 24 chunks had gap 0);
4. chunks whose gap is below ``-threshold`` are left out of the prompt: never fetched, never placed; at least
   ``min_kept`` chunks (the best gaps) stay.

A chunk without an abstract (stored before abstracts were on, or evicted) is always fetched; a prompt with
one is not scored at all (its bound is unknown, so no other chunk's gap can be measured against it). Left-out
chunks are reported with ``source="skipped"`` and their gap (``ChunkInfo.abstract_gap``).

Why leave out, not fetch at a low codec level: the store keeps one encoding per entry, so a low-level fetch needs
a second copy of every chunk written at warm time; measured on SmolLM2 the decision itself, not the fetch, is
what limits the answers (``bench/RESULTS.md``, reuse decisions), so the cheaper action was built first.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ragkv.codecs import get_codec
from ragkv.kvstore.container import decode_entry, encode_entry
from ragkv.kvstore.errors import ConfigError, RagKVError
from ragkv.middleware.abstracts import ChunkAbstract, abstract_key
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.assembly import AssembledPrompt
from ragkv.middleware.rope import delta_cos_sin, rotate_half

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AbstractsConfig:
    enabled: bool = False
    layers: int = 8  # the first layers whose abstracts are stored and whose query rows are scored
    threshold: float = 3.0  # leave out a chunk whose gap is below -threshold (natural-log units of attention)
    min_chunks: int = 8  # score only prompts with at least this many chunks
    min_kept: int = 2  # never keep fewer chunks than this
    cache_bytes: int = 64 << 20  # abstracts kept decoded in process memory

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ConfigError(f"abstracts need at least one layer, got {self.layers}")
        if not self.threshold >= 0:
            raise ConfigError(f"threshold must be >= 0, got {self.threshold}")
        if self.min_chunks < 1 or self.min_kept < 0 or self.cache_bytes < 0:
            raise ConfigError("min_chunks must be >= 1, min_kept and cache_bytes >= 0")


@dataclass(frozen=True)
class AbstractChoice:
    """What ``choose`` decided for one prompt: the gap of every scored chunk (by the request's chunk index),
    the chunks left out, and the seconds the abstract reads, the query pass and the bounds took."""

    gaps: dict[int, float]
    skipped: tuple[int, ...]
    seconds: float


class ChunkAbstracts:
    """Writes, reads (cached) and scores chunk abstracts for one engine."""

    def __init__(self, adapter: ModelAdapter, store: Any, config: AbstractsConfig = AbstractsConfig()) -> None:
        self.adapter = adapter
        self.store = store
        self.config = config
        self.layers = min(config.layers, adapter.num_layers)
        self._cache: OrderedDict[str, ChunkAbstract] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self.counters = {"written": 0, "write_failed": 0, "read": 0, "missing": 0, "prompts_scored": 0, "chunks_skipped": 0,
                         "tokens_skipped": 0}

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    # -- storage -------------------------------------------------------------------------------------------
    def write(self, key: str, kv: torch.Tensor, position: int, ttl_s: float | None = None) -> None:
        """Store the abstract of the chunk stored under ``key`` (kv [L, 2, H, T, D]); a store error is logged and
        counted (``write_failed``), not raised: that chunk is then always fetched."""
        if not self.enabled:
            return
        try:
            target = abstract_key(key)
        except ConfigError:  # a caller's own key too long to carry the suffix: that chunk has no abstract
            return
        abstract = ChunkAbstract.from_kv(kv[:self.layers], position)
        blob = encode_entry(abstract.to_chunk(str(self.adapter.fingerprint)), get_codec("raw"), None, target)
        try:
            self.store.put_blob(target, blob, ttl_s=ttl_s)
        except RagKVError as exc:  # the chunk is stored; without its abstract it is simply always fetched
            log.warning("storing the abstract of %s failed: %s", key, exc)
            self._count(write_failed=1)
            return
        self._remember(key, abstract)
        self._count(written=1)

    def read(self, key: str) -> ChunkAbstract | None:
        """The abstract of the chunk under ``key``: from the cache, else from the store; None when there is none
        usable (absent, corrupt, lossily re-encoded, another model's, or covering fewer layers)."""
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.counters["read"] += 1
                return found
        found = self._load(key)
        self._count(**({"read": 1} if found is not None else {"missing": 1}))
        if found is not None:
            self._remember(key, found)
        return found

    def _load(self, key: str) -> ChunkAbstract | None:
        try:
            target = abstract_key(key)
            blob = self.store.get_blob(target)
            if blob is None:
                return None
            header, chunk = decode_entry(blob, self.store.limits, target)
            if not get_codec(header.codec, header.params).lossless:
                return None
            if chunk.meta.fingerprint != str(self.adapter.fingerprint):
                return None
            abstract = ChunkAbstract.from_chunk(chunk)
        except RagKVError as exc:  # CorruptEntry and ConfigError included
            log.debug("abstract of %s unusable: %s", key, exc)
            return None
        a = self.adapter
        if abstract.num_layers < self.layers or abstract.kmin.shape[1:] != (a.num_kv_heads, a.head_dim):
            return None
        if abstract.num_layers > self.layers:  # written with more layers than this engine scores
            abstract = ChunkAbstract(abstract.kmin[:self.layers], abstract.kmax[:self.layers], abstract.position,
                                     abstract.num_tokens)
        return abstract

    def _remember(self, key: str, abstract: ChunkAbstract) -> None:
        limit = self.config.cache_bytes
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._cache_bytes -= old.nbytes
            if abstract.nbytes > limit:
                return
            self._cache[key] = abstract
            self._cache_bytes += abstract.nbytes
            while self._cache_bytes > limit:
                _, dropped = self._cache.popitem(last=False)
                self._cache_bytes -= dropped.nbytes

    def forget(self, keys: Iterable[str]) -> None:
        """Drop cached abstracts (their chunks were deleted)."""
        with self._lock:
            for key in keys:
                old = self._cache.pop(key, None)
                if old is not None:
                    self._cache_bytes -= old.nbytes

    # -- choosing ------------------------------------------------------------------------------------------
    def choose(self, prompt: AssembledPrompt, prefix_kv: torch.Tensor, exempt: Iterable[int] = ()
               ) -> AbstractChoice | None:
        """Which chunks of ``prompt`` to leave out (``exempt``: chunks never left out, e.g. recomputed from text);
        None when the prompt is not scored (abstracts off, too few chunks, a chunk without an abstract)."""
        c = self.config
        segments = prompt.chunks
        if not self.enabled or len(segments) < c.min_chunks:
            return None
        start = time.perf_counter()
        abstracts = {}
        for s in segments:
            found = self.read(s.key) if s.key else None
            if found is None:
                return None
            abstracts[s.index] = found
        gaps = self.gaps(prompt, prefix_kv, abstracts)
        exempt = set(exempt)
        ranked = sorted(gaps, key=lambda i: -gaps[i])
        protected = set(ranked[:c.min_kept]) | exempt
        skipped = tuple(sorted(i for i in ranked if gaps[i] < -c.threshold and i not in protected))
        lengths = {s.index: s.length for s in segments}
        self._count(prompts_scored=1, chunks_skipped=len(skipped), tokens_skipped=sum(lengths[i] for i in skipped))
        return AbstractChoice(gaps, skipped, time.perf_counter() - start)

    @torch.no_grad()
    def gaps(self, prompt: AssembledPrompt, prefix_kv: torch.Tensor, abstracts: dict[int, ChunkAbstract]
             ) -> dict[int, float]:
        """Each chunk's gap (see the module docstring), by chunk index."""
        a = self.adapter
        queries: dict[int, torch.Tensor] = {}
        prefix_len = prompt.prefix.length
        a.prefill(torch.tensor([list(prompt.query.token_ids)]), start_position=prefix_len,
                  past=prefix_kv if prefix_len else None, layers=self.layers,
                  observe=lambda layer, q, k: queries.__setitem__(layer, q[0].to(torch.float32).cpu()))
        cos, sin = delta_cos_sin(a.inv_freq, prompt.query.start - prefix_len)  # to the query's real position
        segments = [s for s in prompt.chunks if s.index in abstracts]
        mean_gap = torch.zeros(len(segments))
        for layer in range(self.layers):
            q = queries[layer] * cos + rotate_half(queries[layer]) * sin  # [Hq, R, D]
            scale = float(a.layers[layer].self_attn.scaling)
            bounds = torch.stack([abstracts[s.index].log_mass_bound(layer, q, s.start, a.inv_freq, scale)
                                  for s in segments])  # [C, Hq, R]
            gap = bounds - bounds.max(dim=0).values
            mean_gap += gap.flatten(1).mean(dim=1) / self.layers
        return {s.index: float(g) for s, g in zip(segments, mean_gap)}

    def _count(self, **increments: int) -> None:
        with self._lock:
            for k, v in increments.items():
                self.counters[k] += v

    def summary(self) -> dict[str, Any]:
        with self._lock:
            cached, cached_bytes = len(self._cache), self._cache_bytes
            counters = dict(self.counters)
        c = self.config
        return {"enabled": c.enabled, "layers": self.layers, "threshold": c.threshold, "min_chunks": c.min_chunks,
                "cached": cached, "cached_bytes": cached_bytes, **counters}


__all__ = ["AbstractChoice", "AbstractsConfig", "ChunkAbstracts"]
