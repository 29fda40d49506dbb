"""``TieredStore``: tiers composed in order (fastest first) behind the same interface as one tier.

Reads go through the tiers in order; a hit in a slower tier is promoted into the faster ones (an encoded
blob moves between encoded tiers without being decoded). Writes go to every tier, either synchronously
(write-through) or to the fastest tier at once and to the others from a bounded background queue
(write-back, ``ragkv.kvstore.write_back``). A miss is ``None``.

What the store promises (README, "Store semantics"):

- **last write wins per key**; ``delete`` wins over a promotion in flight (reads that promote and writes
  of one key are serialised by a per-key lock; other keys are not held up);
- **a failed put leaves nothing**: arguments (key, TTL, finite KV) are checked before any tier is
  written, and a tier that raises while writing makes the put remove what it wrote and raise
  ``StoreWriteError``. Tiers that degrade on their own (a down Redis, a full disk) drop the write and
  count it in their ``errors``: a cache may lose entries, never serve a wrong one;
- **TTL travels with the entry** into every tier, through promotion, ``get_blob`` and ``put_blob``;
  **pin and TTL are independent**: a pinned entry is never evicted for space, and still expires;
- a closed store raises ``StoreClosed``.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ragkv.kvstore.artefacts import read_artefact, write_artefact
from ragkv.kvstore.chunk import ChunkKV, check_key
from ragkv.kvstore.config import StoreConfig, resolve_config
from ragkv.kvstore.container import KEEP, decode_entry, encode_entry, rewrite_header
from ragkv.kvstore.errors import ConfigError, CorruptEntry, StoreClosed, StoreWriteError
from ragkv.kvstore.header_schema import EntryHeader, EntryLimits
from ragkv.kvstore.store_async import TieredAsyncAPI
from ragkv.kvstore.tiers.base import Tier, expiry_time, make_tier
from ragkv.kvstore.write_back import PendingWrite, WriteBackQueue

_KEY_LOCK_STRIPES = 256


class TieredStore(TieredAsyncAPI):
    """Compose tiers fastest-first. Thread-safe; a context manager; async forms of the operations (``aget``,
    ``aget_many``, ``aput``, ``adelete``, ``acontains``) for asyncio applications."""

    def __init__(self, config: StoreConfig | str | os.PathLike[str] | Sequence[Tier] | None = None) -> None:
        if isinstance(config, (list, tuple)) and config and all(isinstance(t, Tier) for t in config):
            self.config = StoreConfig(tiers=tuple(t.config for t in config))
            self.tiers: list[Tier] = list(config)
        else:
            self.config = resolve_config(config)  # type: ignore[arg-type]
            self.tiers = []
            try:
                for tc in self.config.tiers:
                    self.tiers.append(make_tier(tc))
            except BaseException:
                for t in self.tiers:
                    t.close()
                raise
        self.names = _unique_names(self.tiers)
        self.limits = EntryLimits(self.config.max_entry_elements)
        for tier in self.tiers:
            tier.limits = self.limits
        self._counters = {"hits": 0, "misses": 0, "promotions": 0, "writeback_failed": 0}
        self._counter_lock = threading.Lock()
        self._key_locks = [threading.RLock() for _ in range(_KEY_LOCK_STRIPES)]
        self._generations = [0] * _KEY_LOCK_STRIPES
        self._pool = ThreadPoolExecutor(self.config.prefetch_workers, thread_name_prefix="ragkv-prefetch")
        self._closed = False
        self._active = 0  # writers inside put/put_blob; close waits for them
        self._lifecycle = threading.Condition()
        self._write_back: WriteBackQueue | None = None
        if self.config.write_policy == "write-back" and len(self.tiers) > 1:
            self._write_back = WriteBackQueue(
                self.config.write_queue_size, self._key_lock,
                lambda key, pending: self._write(key, pending.chunk, pending.expires_at, self.tiers[1:]), self._count)

    @property
    def _pending(self) -> dict[str, PendingWrite]:
        return self._write_back.pending if self._write_back is not None else {}

    def _live_pending(self, key: str) -> PendingWrite | None:
        """The value of ``key`` waiting for write-back, unless it expired meanwhile (then it is a miss; the
        worker, finding it expired, removes the key from the slower tiers)."""
        pending = self._pending.get(key)
        if pending is None or (pending.expires_at is not None and time.time() >= pending.expires_at):
            return None
        return pending

    def _key_lock(self, key: str) -> threading.RLock:
        return self._key_locks[hash(key) % _KEY_LOCK_STRIPES]

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("this store is closed")

    def limit_entries(self, max_elements: int) -> None:
        """Narrow what a blob may declare (e.g. to the largest chunk the served model makes); never widens."""
        self.limits = EntryLimits(min(max_elements, self.limits.max_elements))
        for tier in self.tiers:
            tier.limits = self.limits

    # -- reads -------------------------------------------------------------------------------------------
    def _fast_hit(self, key: str) -> ChunkKV | None:
        """A value waiting for write-back, or a hit in a decoded first tier (no lock, no I/O); counted."""
        pending = self._live_pending(key)
        chunk = pending.chunk if pending is not None else None
        first = self.tiers[0]
        if chunk is None and not first.holds_encoded:
            chunk = first.get(key)
        if chunk is not None:
            self._count(hits=1)
        return chunk

    def _generation(self, key: str) -> int:
        """Bumped by every write and delete of a key in ``key``'s lock stripe (see ``_promote_unless_changed``)."""
        return self._generations[hash(key) % _KEY_LOCK_STRIPES]

    def _bump(self, key: str) -> None:
        self._generations[hash(key) % _KEY_LOCK_STRIPES] += 1  # under the key's lock

    def _promote_unless_changed(self, key: str, hit_index: int, chunk: ChunkKV, blob: bytes | None,
                                expires_at: float | None, generation: int) -> None:
        """``_promote`` a value read without the key's lock, unless the key was written or deleted since the
        read began (then the faster tiers must not get the older value)."""
        with self._key_lock(key):
            if self._generation(key) == generation and key not in self._pending:
                self._promote(key, hit_index, chunk, blob, expires_at)

    def get(self, key: str) -> ChunkKV | None:
        """The chunk, from the fastest tier holding it (promoted into faster tiers), or ``None``."""
        check_key(key)
        self._check_open()
        chunk = self._fast_hit(key)
        if chunk is not None:
            return chunk
        with self._key_lock(key):  # a delete or write of this key waits until the promotion is done
            pending = self._live_pending(key)
            if pending is not None:
                self._count(hits=1)
                return pending.chunk
            for i, tier in enumerate(self.tiers):
                if i == 0 and not tier.holds_encoded:
                    continue
                found = self._read(tier, key)
                if found is not None:
                    chunk, blob, expires_at = found
                    self._promote(key, i, chunk, blob, expires_at)
                    self._count(hits=1)
                    return chunk
        self._count(misses=1)
        return None

    def _read(self, tier: Tier, key: str) -> tuple[ChunkKV, bytes | None, float | None] | None:
        if not tier.holds_encoded:
            chunk = tier.get(key)
            return None if chunk is None else (chunk, None, tier.expiry(key))
        blob = tier.get_blob(key)
        return None if blob is None else self._decode_read(tier, key, blob)

    def _decode_read(self, tier: Tier, key: str, blob: bytes) -> tuple[ChunkKV, bytes, float | None] | None:
        """A blob read from an encoded tier, decoded; a corrupt one is deleted there and is a miss."""
        try:
            header, chunk = decode_entry(blob, self.limits, key)
        except CorruptEntry:
            tier.delete(key)
            tier.stats.add(corrupt=1)
            return None
        return chunk, blob, header.expires_at

    def get_blob(self, key: str) -> bytes | None:
        """The container blob of ``key`` (as the fastest holding tier has or encodes it, with its expiry), or
        ``None``."""
        check_key(key)
        self._check_open()
        pending = self._live_pending(key)
        if pending is not None:
            return encode_entry(pending.chunk, self.tiers[-1].codec, pending.expires_at, key)
        for tier in self.tiers:
            blob = tier.get_blob(key)
            if blob is not None:
                self._count(hits=1)
                return blob
        self._count(misses=1)
        return None

    def locate(self, key: str) -> str | None:
        """Name of the fastest tier that holds ``key``, or ``None``."""
        check_key(key)
        if self._live_pending(key) is not None:
            return self.names[0]
        for name, tier in zip(self.names, self.tiers):
            if tier.contains(key):
                return name
        return None

    def contains(self, key: str) -> bool:
        return self.locate(key) is not None

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        found = [self._live_pending(k) is not None for k in keys]
        for tier in self.tiers:
            todo = [i for i, f in enumerate(found) if not f]
            if not todo:
                break
            for i, present in zip(todo, tier.contains_many([keys[i] for i in todo])):
                found[i] = present
        return found

    def get_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        """Fetch many keys: fastest-tier hits at once, the rest concurrently on the prefetch pool."""
        return [f.result() for f in self.prefetch(keys)]

    def prefetch(self, keys: Sequence[str]) -> list[Future[ChunkKV | None]]:
        """Start fetching ``keys``; returns one future per key (hits in the first tier are already done)."""
        self._check_open()
        futures: list[Future[ChunkKV | None]] = []
        first = self.tiers[0]
        for key in keys:
            check_key(key)
            chunk = None if first.holds_encoded or key in self._pending else first.get(key)
            if chunk is not None:
                self._count(hits=1)
                done: Future[ChunkKV | None] = Future()
                done.set_result(chunk)
                futures.append(done)
            else:
                futures.append(self._pool.submit(self.get, key))
        return futures

    def keys(self, namespace: str | None = None) -> Iterator[str]:
        seen: set[str] = {k for k in list(self._pending) if namespace is None or k.startswith(namespace + ":")}
        for tier in self.tiers:
            seen.update(tier.keys(namespace))
        return iter(sorted(seen))

    def usage(self, namespace: str) -> dict[str, int]:
        """Bytes ``namespace`` holds: ``bytes`` and ``pinned_bytes``, the largest over the tiers that count."""
        out = {"bytes": 0, "pinned_bytes": 0}
        for tier in self.tiers:
            used, pinned = tier.namespace_usage(namespace)
            out["bytes"] = max(out["bytes"], used)
            out["pinned_bytes"] = max(out["pinned_bytes"], pinned)
        return out

    # -- writes ------------------------------------------------------------------------------------------
    def put(self, key: str, chunk: ChunkKV, ttl_s: float | None = None) -> None:
        """Store ``chunk`` under ``key`` in every tier (now, or the slower ones from the write-back queue).

        ``ConfigError`` for a bad TTL or non-finite KV (nothing written); ``StoreWriteError`` if a tier
        raised (nothing left written); ``StoreClosed`` after ``close``."""
        check_key(key)
        expires_at = expiry_time(ttl_s)
        if chunk.kv.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(chunk.kv)):
            # aminmax: one pass, no tensor-sized temporary (isfinite().all() is ~30x slower here)
            raise ConfigError(f"chunk {key} holds non-finite KV (NaN or inf); refusing to store it")
        with _Writer(self):
            with self._key_lock(key):
                self._bump(key)
                if self._write_back is None:
                    self._write(key, chunk, expires_at, self.tiers)
                    return
                self._write(key, chunk, expires_at, self.tiers[:1])
                self._write_back.submit(key, PendingWrite(chunk, expires_at))
            self._write_back.enqueue(key)

    def put_blob(self, key: str, blob: bytes, ttl_s: float | None = None) -> EntryHeader:
        """Store a container blob as it is: validated first (``CorruptEntry`` if it is not one, or was written
        under another key), never decoded when an encoded tier can hold it. Decoded tiers drop their old
        value of ``key`` and get the new one by promotion on the next read. Returns the header."""
        check_key(key)
        header, blob = rewrite_header(blob, key=key, limits=self.limits,
                                      expires_at=KEEP if ttl_s is None else expiry_time(ttl_s))
        expires_at = header.expires_at
        with _Writer(self), self._key_lock(key):
            self._bump(key)
            if self._write_back is not None:
                self._write_back.cancel(key)
            encoded = [t for t in self.tiers if t.holds_encoded]
            written: list[Tier] = []
            try:
                if not encoded:
                    chunk = decode_entry(blob, self.limits, key)[1]
                    self._write(key, chunk, expires_at, self.tiers)
                    return header
                for tier in self.tiers:
                    written.append(tier)
                    if tier.holds_encoded:
                        tier.put_blob(key, blob)
                    else:
                        tier.delete(key)
            except (StoreWriteError, CorruptEntry):
                raise
            except Exception as exc:
                self._undo(key, written)
                raise StoreWriteError(f"storing {key} failed in a tier, nothing kept: {exc}") from exc
        return header

    def put_many(self, items: Iterable[tuple[str, ChunkKV]], ttl_s: float | None = None) -> None:
        for key, chunk in items:
            self.put(key, chunk, ttl_s=ttl_s)

    def delete(self, key: str) -> bool:
        check_key(key)
        self._check_open()
        with self._key_lock(key):
            self._bump(key)
            removed = self._write_back.cancel(key) if self._write_back is not None else False
            for tier in self.tiers:
                removed = tier.delete(key) or removed
        return removed

    def delete_many(self, keys: Iterable[str]) -> int:
        return sum(1 for k in keys if self.delete(k))

    # -- artefacts (see ragkv.kvstore.artefacts) ---------------------------------------------------------------
    def put_artefact(self, data: bytes) -> str:
        """Keep a content-addressed artefact (e.g. a transform basis) in every tier; returns its digest."""
        self._check_open()
        return write_artefact(self.tiers, data)

    def get_artefact(self, digest: str) -> bytes | None:
        """An artefact's verified bytes from the fastest tier holding a good copy (copied up into faster tiers), or
        None (also once the store is closed). Each tier is itself a source of transform bases, so chunks coded
        against a basis the store holds decode in this process without more set-up."""
        if self._closed:
            return None
        return read_artefact(self.tiers, digest)

    def pin(self, key: str) -> None:
        """Never evict ``key`` for space from any tier (also copies promoted later). It still expires."""
        for tier in self.tiers:
            tier.pin(key)

    def unpin(self, key: str) -> None:
        for tier in self.tiers:
            tier.unpin(key)

    def promote(self, key: str, chunk: ChunkKV, from_tier: str, expires_at: float | None = None) -> None:
        """Copy ``chunk``, which a caller read from tier ``from_tier`` and decoded itself (e.g. layer by layer),
        into the faster tiers, as ``get`` would have; counted as a promotion. Nothing happens if the key was
        deleted or rewritten meanwhile (``from_tier`` no longer holds it, or a newer value is pending)."""
        check_key(key)
        if from_tier not in self.names:
            raise ConfigError(f"unknown tier {from_tier!r}; this store has {self.names}")
        index = self.names.index(from_tier)
        with self._key_lock(key):
            if key in self._pending or not self.tiers[index].contains(key):
                return
            self._promote(key, index, chunk, None, expires_at)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the write-back queue is drained; True when it is."""
        return True if self._write_back is None else self._write_back.flush(timeout_s)

    # -- internals ---------------------------------------------------------------------------------------
    def _write(self, key: str, chunk: ChunkKV, expires_at: float | None, tiers: Sequence[Tier]) -> None:
        """Write ``chunk`` to ``tiers`` (caller holds the key lock); on a raising tier undo and raise."""
        ttl_s = _remaining(expires_at)
        blobs: dict[tuple[str, str], bytes] = {}  # encode once per distinct codec configuration
        written: list[Tier] = []
        try:
            for tier in tiers:
                if expires_at is not None and ttl_s is None:
                    tier.delete(key)  # expired while being written: the old value must not stay either
                    continue
                written.append(tier)
                if tier.holds_encoded:
                    sig = _codec_signature(tier)
                    blob = blobs.get(sig)
                    if blob is None:
                        blob = blobs[sig] = encode_entry(chunk, tier.codec, expires_at, key)
                    tier.put_blob(key, blob)
                else:
                    tier.put(key, chunk, ttl_s=ttl_s)
        except Exception as exc:
            self._undo(key, written)
            raise StoreWriteError(f"storing {key} failed in a tier, nothing kept: {exc}") from exc

    def _undo(self, key: str, tiers: Sequence[Tier]) -> None:
        for tier in tiers:
            try:
                tier.delete(key)
            except Exception:  # noqa: BLE001 - best effort; the write error is what the caller sees
                tier.stats.add(errors=1)

    def _promote(self, key: str, hit_index: int, chunk: ChunkKV, blob: bytes | None, expires_at: float | None) -> None:
        if not self.config.promote or hit_index == 0:
            return
        ttl_s = _remaining(expires_at)
        if expires_at is not None and ttl_s is None:
            return
        source = _codec_signature(self.tiers[hit_index])
        for tier in self.tiers[:hit_index]:
            if tier.holds_encoded and blob is not None and _codec_signature(tier) == source:
                tier.put_blob(key, blob)
            elif tier.holds_encoded:
                tier.put_blob(key, encode_entry(chunk, tier.codec, expires_at, key))
            else:
                tier.put(key, chunk, ttl_s=ttl_s)
        self._count(promotions=1)

    def _count(self, **increments: int) -> None:
        with self._counter_lock:
            for k, v in increments.items():
                self._counters[k] += v

    # -- stats and lifecycle -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._counter_lock:
            counters = dict(self._counters)
        lookups = counters["hits"] + counters["misses"]
        return {
            **counters,
            "hit_rate": counters["hits"] / lookups if lookups else None,
            "write_policy": self.config.write_policy,
            "writeback_pending": len(self._pending),
            "max_entry_elements": self.limits.max_elements,
            "tiers": {name: tier.describe() for name, tier in zip(self.names, self.tiers)},
        }

    def close(self) -> None:
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._lifecycle.wait()
        if self._write_back is not None:
            self._write_back.stop()
        self._pool.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TieredStore({', '.join(self.names)}; {self.config.write_policy})"


class _Writer:
    """Counts a write in progress so ``close`` waits for it; refuses to start once the store is closed."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def __enter__(self) -> None:
        with self.store._lifecycle:
            self.store._check_open()
            self.store._active += 1

    def __exit__(self, *exc: object) -> None:
        with self.store._lifecycle:
            self.store._active -= 1
            self.store._lifecycle.notify_all()


def _remaining(expires_at: float | None) -> float | None:
    if expires_at is None:
        return None
    left = expires_at - time.time()
    return left if left > 0 else None


def _codec_signature(tier: Tier) -> tuple[str, str]:
    return tier.codec.name, json.dumps(tier.codec.params.to_dict(), sort_keys=True)


def _unique_names(tiers: Sequence[Tier]) -> list[str]:
    names: list[str] = []
    for tier in tiers:
        name = tier.kind
        n = 2
        while name in names:
            name = f"{tier.kind}{n}"
            n += 1
        names.append(name)
    return names


def open_store(config: StoreConfig | str | os.PathLike[str] | None = None) -> TieredStore:
    """Open a store from a config, a spec string, a config file path, or None for the embedded default."""
    return TieredStore(config)
