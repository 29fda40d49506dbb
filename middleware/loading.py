"""Fetching cached chunks from the store, with layer-wise pipelining for chunks held encoded on slow tiers.

A chunk on a fast tier (host, device) arrives decoded: every layer is ready at once. A chunk on a slow tier
(disk, Redis) arrives as a container blob. With pipelining, one background thread reads the blobs,
validates each once (``read_entry``: magic, sizes, checksum), then decodes them layer-major (layer 0 of
every chunk, then layer 1, ...) with the codec's ``decode_layers`` on the payload, while the caller
computes; ``layer(l)`` blocks only until layer ``l`` is decoded. ``blend`` recomputes every chunk row in
layer 0 and so needs no cached KV there: the reading overlaps layer 0's compute, the decoding the rest.

The store may be one ``Tier`` or a ``TieredStore`` (anything with ``tiers``/``names``); any other object
with ``get``/``contains`` works, without pipelining. A chunk whose metadata does not match what the
adapter expects (fingerprint, token ids, shape, dtype) is never served: without pipelining it is a miss;
with pipelining, where that is found out in the background, it is recomputed from its tokens (and stored
back) when first needed, as is a blob that fails to decode mid-way.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ragkv.codecs import CodecError, get_codec
from ragkv.codecs.base import dtype_from_name
from ragkv.kvstore.chunk import ChunkKV, ChunkMeta
from ragkv.kvstore.container import read_entry
from ragkv.kvstore.errors import CorruptEntry, TierUnavailable
from ragkv.middleware.adapter import ModelAdapter

log = logging.getLogger(__name__)

DECODED = "decoded"  # codec reported for chunks held as tensors (host/device tiers)


@dataclass
class LoadedChunk:
    """One chunk's KV as it arrives: whole (fast tiers, or just computed) or layer by layer (slow tiers).

    For a pipelined load from a slow tier, ``meta`` is first the expected metadata and is replaced by the
    stored one once the background thread has read and validated the blob (``wait_meta``).
    """

    key: str
    meta: ChunkMeta
    tier: str | None  # tier it came from, or None when it was just computed
    codec: str | None
    nbytes: int
    hit: bool = True
    load_seconds: float = 0.0
    _full: torch.Tensor | None = None  # [L, 2, H, T, D]
    _layers: list[torch.Tensor | None] = field(default_factory=list)
    _ready: list[threading.Event] = field(default_factory=list)
    _meta_ready: threading.Event | None = None
    _error: BaseException | None = None
    _recompute: Callable[[], ChunkKV] | None = None
    stored: bool = False  # recomputed after a failed load and written back

    @property
    def num_tokens(self) -> int:
        return len(self.meta.token_ids)

    def wait_meta(self) -> ChunkMeta:
        """The stored metadata (waits for the blob's header when it is still being fetched)."""
        if self._meta_ready is not None and self._full is None:
            self._meta_ready.wait()
            if self._error is not None:
                self._fallback()
        return self.meta

    def layer(self, layer: int) -> torch.Tensor:
        """[2, H, T, D] of ``layer``; waits for a pipelined decode to reach it."""
        if self._full is not None:
            return self._full[layer]
        self._ready[layer].wait()
        if self._error is not None:
            self._fallback()
            return self._full[layer]  # type: ignore[index]
        return self._layers[layer]  # type: ignore[return-value]

    def _fallback(self) -> None:
        """A blob that could not be used after all (unreadable, invalid, or failing to decode mid-way):
        compute the chunk from its tokens instead."""
        if self._full is not None:
            return
        if self._recompute is None:
            raise CorruptEntry(f"chunk {self.key} could not be loaded: {self._error}") from self._error
        log.warning("chunk %s could not be loaded (%s); recomputing it from its tokens", self.key, self._error)
        chunk = self._recompute()
        self._full, self.meta = chunk.kv, chunk.meta
        self.tier, self.codec, self.hit = None, None, False


@dataclass
class _Pending:
    chunk: LoadedChunk
    tier: Any
    token_ids: Sequence[int]
    payload: memoryview | None = None
    codec: Any = None
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    expires_at: float | None = None


class ChunkLoader:
    """Loads chunks for one adapter from a store; see the module docstring."""

    def __init__(self, adapter: ModelAdapter, store: Any, promote: bool = True) -> None:
        self.adapter = adapter
        self.store = store
        self.promote = promote

    # -- where is a key --------------------------------------------------------------------------------------
    def _tiers(self) -> list[tuple[str, Any]]:
        tiers = getattr(self.store, "tiers", None)
        if tiers is not None:
            names = getattr(self.store, "names", None) or [t.kind for t in tiers]
            return list(zip(names, tiers))
        if hasattr(self.store, "holds_encoded"):  # a single Tier
            return [(self.store.kind, self.store)]
        return []

    def locate(self, key: str) -> list[tuple[str, Any]]:
        """(name, tier) of every tier holding ``key``, fastest first (empty for an opaque store)."""
        found = []
        for name, tier in self._tiers():
            try:
                if tier.contains(key):
                    found.append((name, tier))
            except TierUnavailable:
                continue
        return found

    def _valid(self, meta: ChunkMeta, shape: Sequence[int], dtype: str, token_ids: Sequence[int]) -> bool:
        a = self.adapter
        expected = (a.num_layers, 2, a.num_kv_heads, len(token_ids), a.head_dim)
        ok = (meta.fingerprint == str(a.fingerprint) and tuple(meta.token_ids) == tuple(token_ids)
              and tuple(shape) == expected and dtype == a.dtype_name and meta.rope)
        if not ok:
            log.warning("ignoring a stored chunk that does not match the model or its tokens (treated as a miss)")
        return ok

    def _expected_meta(self, token_ids: Sequence[int]) -> ChunkMeta:
        return ChunkMeta(fingerprint=str(self.adapter.fingerprint), token_ids=tuple(token_ids), position=1,
                         dtype=self.adapter.dtype_name, rope=True)

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self, keys: Sequence[str], token_lists: Sequence[Sequence[int]], pipelined: bool = True,
             recompute: Callable[[int], ChunkKV] | None = None, sources: Sequence[str | None] | None = None,
             ) -> list[LoadedChunk | None]:
        """Fetch ``keys``; ``None`` for a miss. ``sources`` optionally names the tier to read each key from
        (the controller's choice), else the fastest holder. With ``pipelined``, chunks held encoded are read,
        validated and decoded layer by layer in a background thread (a blob that turns out unusable there
        is recomputed from its tokens when first needed)."""
        results: list[LoadedChunk | None] = [None] * len(keys)
        pending: list[_Pending] = []
        tiers = self._tiers()
        for i, (key, ids) in enumerate(zip(keys, token_lists)):
            start = time.perf_counter()
            if not tiers:  # opaque store: plain get
                chunk = self.store.get(key)
                if chunk is not None and self._valid(chunk.meta, chunk.kv.shape, _dtype_name(chunk.kv), ids):
                    results[i] = LoadedChunk(key, chunk.meta, type(self.store).__name__, DECODED, chunk.nbytes,
                                             load_seconds=time.perf_counter() - start, _full=chunk.kv)
                continue
            wanted = sources[i] if sources is not None else None
            holders = self.locate(key)
            if wanted is not None:  # the planned tier first, the others as a fallback
                holders = sorted(holders, key=lambda h: h[0] != wanted)
            for name, tier in holders:
                loaded = self._load_from(name, tier, key, ids, pipelined, pending, start)
                if loaded is not None:
                    if recompute is not None:
                        loaded._recompute = (lambda idx=i: recompute(idx))
                    results[i] = loaded
                    break
        if pending:
            thread = threading.Thread(target=self._fetch_and_decode, args=(pending,), name="ragkv-layer-decode",
                                      daemon=True)
            thread.start()
        return results

    def _load_from(self, name: str, tier: Any, key: str, ids: Sequence[int], pipelined: bool,
                   pending: list[_Pending], start: float) -> LoadedChunk | None:
        if not tier.holds_encoded:
            if tier is self.store or not hasattr(self.store, "tiers"):
                chunk = tier.get(key)
            else:
                chunk = self.store.get(key)  # the store promotes and counts
            if chunk is None or not self._valid(chunk.meta, chunk.kv.shape, _dtype_name(chunk.kv), ids):
                return None
            return LoadedChunk(key, chunk.meta, name, DECODED, chunk.nbytes,
                               load_seconds=time.perf_counter() - start, _full=chunk.kv)
        num_layers = self.adapter.num_layers
        chunk = LoadedChunk(key, self._expected_meta(ids), name, tier.codec.name, 0,
                            _layers=[None] * num_layers, _ready=[threading.Event() for _ in range(num_layers)],
                            _meta_ready=threading.Event())
        item = _Pending(chunk, tier, ids)
        if pipelined:
            pending.append(item)
            return chunk
        # synchronous: read and validate now, so an unusable blob is an ordinary miss
        if not self._fetch(item):
            return None
        self._decode([item])
        return chunk

    def _fetch(self, p: _Pending) -> bool:
        """Read and validate one blob; on any problem record it on the chunk and return False."""
        c = p.chunk
        start = time.perf_counter()
        problem: str | None = None
        try:
            blob = p.tier.get_blob(c.key)
        except TierUnavailable as exc:
            blob, problem = None, f"tier unavailable: {exc}"
        if blob is None:
            problem = problem or "entry vanished"
        else:
            try:
                header, payload = read_entry(blob, p.tier.limits, c.key)
            except CorruptEntry as exc:
                p.tier.delete(c.key)
                header, problem = None, f"corrupt entry: {exc}"
            if header is not None:
                if header.expired() or not self._valid(header.meta, header.shape, header.dtype, p.token_ids):
                    problem = "expired or does not match the model"
                else:
                    try:
                        p.codec = get_codec(header.codec, header.params)
                        p.payload, p.shape, p.dtype = payload, header.shape, dtype_from_name(header.dtype)
                        p.expires_at = header.expires_at
                        c.meta, c.codec, c.nbytes = header.meta, header.codec, len(blob)
                    except CodecError as exc:
                        problem = f"codec: {exc}"
        c.load_seconds += time.perf_counter() - start
        if problem is not None:
            c._error = RuntimeError(problem)
            for event in c._ready:
                event.set()
        assert c._meta_ready is not None
        c._meta_ready.set()
        return problem is None

    def _fetch_and_decode(self, pending: list[_Pending]) -> None:
        try:
            ok = [p for p in pending if self._fetch(p)]
            if ok:
                self._decode(ok)
        finally:
            for p in pending:  # whatever happened, no reader may wait forever
                c = p.chunk
                if c._meta_ready is not None and not c._meta_ready.is_set():
                    c._error = c._error or RuntimeError("loading stopped early")
                    c._meta_ready.set()
                if not all(e.is_set() for e in c._ready):
                    c._error = c._error or RuntimeError("layer decoding stopped early")
                    for event in c._ready:
                        event.set()

    def _decode(self, pending: list[_Pending]) -> None:
        """Decode layer-major. A failure is recorded on the chunk (its reader then recomputes it)."""
        num_layers = max(p.shape[0] for p in pending)
        for layer in range(num_layers):
            for p in pending:
                c = p.chunk
                if c._error is None:
                    try:
                        start = time.perf_counter()
                        c._layers[layer] = p.codec.decode_layers(p.payload, p.shape, p.dtype, [layer])[0]
                        c.load_seconds += time.perf_counter() - start
                    except (CodecError, ValueError, RuntimeError, IndexError) as exc:  # reader recomputes
                        c._error = exc
                if c._error is not None:
                    for event in c._ready:
                        event.set()
                else:
                    c._ready[layer].set()
        if self.promote:
            for p in pending:
                self._promote(p.chunk, p.expires_at)

    def _promote(self, chunk: LoadedChunk, expires_at: float | None) -> None:
        """After a load from a slow tier, put the decoded chunk into the faster decoded tiers."""
        tiers = self._tiers()
        if chunk._error is not None or len(tiers) < 2:
            return
        kv = torch.stack([t for t in chunk._layers if t is not None])  # [L, 2, H, T, D]
        promote = getattr(self.store, "promote", None)
        if promote is not None:  # a TieredStore: it promotes and counts
            promote(chunk.key, ChunkKV(kv, chunk.meta), chunk.tier, expires_at)
            return
        for name, tier in tiers:
            if name == chunk.tier:
                break
            if not tier.holds_encoded:
                try:
                    tier.put(chunk.key, ChunkKV(kv, chunk.meta), ttl_s=_remaining(expires_at))
                except TierUnavailable:
                    continue


def _remaining(expires_at: float | None) -> float | None:
    return None if expires_at is None else max(expires_at - time.time(), 1e-3)


def _dtype_name(t: torch.Tensor) -> str:
    from ragkv.codecs.base import DTYPE_NAMES

    return DTYPE_NAMES.get(t.dtype, str(t.dtype))


__all__ = ["DECODED", "ChunkLoader", "LoadedChunk"]
