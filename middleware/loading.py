"""Fetching cached chunks from the store, with layer-wise pipelining for chunks held encoded on slow tiers.

A chunk on a fast tier (host, device) arrives decoded: every layer is ready at once. A chunk on a slow tier
(disk, Redis) arrives as a container blob; a background thread decodes it layer by layer (layer-major over
all such chunks: layer 0 of every chunk, then layer 1, ...) while the caller computes, and ``layer(l)``
blocks only until layer ``l`` is decoded. Each layer is decoded with the codec's ``decode_layers`` from
the payload; the blob's checksum is validated once up front (``read_header``), not once per layer.

The store may be one ``Tier`` or a ``TieredStore`` (anything with ``tiers``/``names``); any other object
with ``get``/``contains`` works, without pipelining. A chunk whose metadata does not match what the
adapter expects (fingerprint, token ids, shape, dtype) is a miss, never served.
"""
from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ragkv.codecs import CodecError, get_codec
from ragkv.codecs.base import dtype_from_name
from ragkv.kvstore.chunk import ChunkKV, ChunkMeta
from ragkv.kvstore.container import read_header
from ragkv.kvstore.errors import CorruptEntry, TierUnavailable
from ragkv.middleware.adapter import ModelAdapter

log = logging.getLogger(__name__)

# The container's documented prefix (magic, version, flags, header length, payload length); see
# ragkv.kvstore.container. read_header() has validated the whole blob before we slice it.
_CONTAINER_PREFIX = struct.Struct("<4sHHIQ")
DECODED = "decoded"  # codec reported for chunks held as tensors (host/device tiers)


@dataclass
class LoadedChunk:
    """One chunk's KV as it arrives: whole (fast tiers, or just computed) or layer by layer (slow tiers)."""

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
    _error: BaseException | None = None
    _recompute: Callable[[], ChunkKV] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.meta.token_ids)

    def layer(self, layer: int) -> torch.Tensor:
        """[2, H, T, D] of ``layer``; waits for a pipelined decode to reach it."""
        if self._full is not None:
            return self._full[layer]
        self._ready[layer].wait()
        if self._error is not None:
            self._fallback()
            return self._full[layer]  # type: ignore[index]
        return self._layers[layer]  # type: ignore[return-value]

    def full(self) -> torch.Tensor:
        """[L, 2, H, T, D], waiting for every layer."""
        if self._full is None:
            layers = [self.layer(i) for i in range(len(self._ready))]
            if self._full is None:
                self._full = torch.stack(layers)
                self._layers = []
        return self._full

    def _fallback(self) -> None:
        """A blob that validated but failed to decode: compute the chunk from its tokens instead."""
        if self._full is not None:
            return
        if self._recompute is None:
            raise CorruptEntry(f"chunk {self.key} failed to decode: {self._error}") from self._error
        log.warning("chunk %s failed to decode (%s); recomputing it from its tokens", self.key, self._error)
        self._full = self._recompute().kv
        self.tier, self.codec, self.hit = None, None, False


@dataclass
class _Pending:
    chunk: LoadedChunk
    payload: memoryview
    codec: Any
    shape: tuple[int, ...]
    dtype: torch.dtype


def _payload(blob: bytes) -> memoryview:
    _, _, _, hdr_len, pay_len = _CONTAINER_PREFIX.unpack_from(blob, 0)
    start = _CONTAINER_PREFIX.size + hdr_len
    return memoryview(blob)[start:start + pay_len]


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

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self, keys: Sequence[str], token_lists: Sequence[Sequence[int]], pipelined: bool = True,
             recompute: Callable[[int], ChunkKV] | None = None, sources: Sequence[str | None] | None = None,
             ) -> list[LoadedChunk | None]:
        """Fetch ``keys``; ``None`` for a miss. ``sources`` optionally names the tier to read each key from
        (the controller's choice); otherwise the fastest holder. With ``pipelined``, chunks held encoded are
        decoded layer by layer in a background thread."""
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
            thread = threading.Thread(target=self._decode_layers, args=(pending,), name="ragkv-layer-decode",
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
        try:
            blob = tier.get_blob(key)
        except TierUnavailable:
            return None
        if blob is None:
            return None
        try:
            header = read_header(blob)
        except CorruptEntry:
            tier.delete(key)
            return None
        if header.expired() or not self._valid(header.meta, header.shape, header.dtype, ids):
            return None
        num_layers = header.shape[0]
        chunk = LoadedChunk(key, header.meta, name, header.codec, len(blob),
                            load_seconds=time.perf_counter() - start,
                            _layers=[None] * num_layers, _ready=[threading.Event() for _ in range(num_layers)])
        try:
            codec = get_codec(header.codec, header.params)
        except CodecError:
            return None
        item = _Pending(chunk, _payload(blob), codec, header.shape, dtype_from_name(header.dtype))
        if pipelined:
            pending.append(item)
        else:
            self._decode_layers([item])
        return chunk

    def _decode_layers(self, pending: list[_Pending]) -> None:
        """Background decode, layer-major. Any failure is recorded on the chunk (its reader then recomputes
        it from its tokens); every event is set in the end, so a reader can never wait forever."""
        try:
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
                    self._promote(p.chunk)
        finally:
            for p in pending:
                if not all(e.is_set() for e in p.chunk._ready):
                    p.chunk._error = p.chunk._error or RuntimeError("layer decoding stopped early")
                    for event in p.chunk._ready:
                        event.set()

    def _promote(self, chunk: LoadedChunk) -> None:
        """After a pipelined load from a slow tier, put the decoded chunk into the faster decoded tiers."""
        tiers = self._tiers()
        if chunk._error is not None or len(tiers) < 2:
            return
        kv = torch.stack([t for t in chunk._layers if t is not None])  # [L, 2, H, T, D]
        for name, tier in tiers:
            if name == chunk.tier:
                break
            if not tier.holds_encoded:
                try:
                    tier.put(chunk.key, ChunkKV(kv, chunk.meta))
                except TierUnavailable:
                    continue


def _dtype_name(t: torch.Tensor) -> str:
    from ragkv.codecs.base import DTYPE_NAMES

    return DTYPE_NAMES.get(t.dtype, str(t.dtype))


__all__ = ["DECODED", "ChunkLoader", "LoadedChunk"]
