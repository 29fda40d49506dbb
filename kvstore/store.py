"""``TieredStore``: tiers composed in order (fastest first) behind the same interface as one tier.

Reads go through the tiers in order; a hit in a slower tier is promoted into the faster ones (an encoded
blob moves between slow tiers with the same codec without being decoded). Writes go to every tier, either
synchronously (write-through) or to the fastest tier at once and to the others from a bounded background
queue (write-back; a full queue blocks the writer, ``flush``/``close`` drain it). A miss is ``None``.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ragkv.kvstore.chunk import ChunkKV, check_key
from ragkv.kvstore.config import StoreConfig, resolve_config
from ragkv.kvstore.container import decode_entry, encode_entry, read_header, with_expiry
from ragkv.kvstore.errors import ConfigError, CorruptEntry
from ragkv.kvstore.tiers.base import Tier, expiry_time, make_tier

log = logging.getLogger(__name__)
_STOP = object()


class TieredStore:
    """Compose tiers fastest-first. Thread-safe; a context manager."""

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
        self._counters = {"hits": 0, "misses": 0, "promotions": 0, "writeback_dropped": 0}
        self._counter_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.config.prefetch_workers, thread_name_prefix="ragkv-prefetch")
        self._closed = False
        # write-back state: the latest pending value per key, a queue of keys, one worker
        self._pending: dict[str, tuple[ChunkKV, float | None]] = {}
        self._write_lock = threading.Lock()
        self._queue: queue.Queue[Any] | None = None
        self._worker: threading.Thread | None = None
        if self.config.write_policy == "write-back" and len(self.tiers) > 1:
            self._queue = queue.Queue(maxsize=self.config.write_queue_size)
            self._worker = threading.Thread(target=self._write_back_loop, name="ragkv-write-back", daemon=True)
            self._worker.start()

    # -- reads -------------------------------------------------------------------------------------------
    def get(self, key: str) -> ChunkKV | None:
        """The chunk, from the fastest tier holding it (promoted into faster tiers), or ``None``."""
        check_key(key)
        pending = self._pending.get(key)
        if pending is not None:
            self._count(hits=1)
            return pending[0]
        for i, tier in enumerate(self.tiers):
            if tier.holds_encoded:
                blob = tier.get_blob(key)
                if blob is None:
                    continue
                try:
                    header, chunk = decode_entry(blob)
                except CorruptEntry:
                    tier.delete(key)
                    tier.stats.add(corrupt=1)
                    continue
                self._promote(key, i, chunk, blob, header.expires_at)
            else:
                chunk = tier.get(key)
                if chunk is None:
                    continue
                self._promote(key, i, chunk, None, tier_expiry(tier, key))
            self._count(hits=1)
            return chunk
        self._count(misses=1)
        return None

    def get_blob(self, key: str) -> bytes | None:
        """The container blob of ``key`` (as the fastest holding tier has or encodes it), or ``None``."""
        check_key(key)
        pending = self._pending.get(key)
        if pending is not None:
            return encode_entry(pending[0], self.tiers[-1].codec, pending[1])
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
        if key in self._pending:
            return self.names[0]
        for name, tier in zip(self.names, self.tiers):
            if tier.contains(key):
                return name
        return None

    def contains(self, key: str) -> bool:
        return self.locate(key) is not None

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        found = [False] * len(keys)
        for tier in self.tiers:
            todo = [i for i, f in enumerate(found) if not f]
            if not todo:
                break
            for i, present in zip(todo, tier.contains_many([keys[i] for i in todo])):
                found[i] = found[i] or present or keys[i] in self._pending
        return found

    def get_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        """Fetch many keys: fastest-tier hits at once, the rest concurrently on the prefetch pool."""
        return [f.result() for f in self.prefetch(keys)]

    def prefetch(self, keys: Sequence[str]) -> list[Future[ChunkKV | None]]:
        """Start fetching ``keys``; returns one future per key (hits in the first tier are already done)."""
        futures: list[Future[ChunkKV | None]] = []
        first = self.tiers[0]
        for key in keys:
            check_key(key)
            chunk = None if first.holds_encoded else first.get(key)
            if chunk is not None:
                self._count(hits=1)
                done: Future[ChunkKV | None] = Future()
                done.set_result(chunk)
                futures.append(done)
            else:
                futures.append(self._pool.submit(self.get, key))
        return futures

    def keys(self, namespace: str | None = None) -> Iterator[str]:
        seen: set[str] = set(k for k in self._pending if namespace is None or k.startswith(namespace + ":"))
        for tier in self.tiers:
            seen.update(tier.keys(namespace))
        return iter(sorted(seen))

    # -- writes ------------------------------------------------------------------------------------------
    def put(self, key: str, chunk: ChunkKV, ttl_s: float | None = None) -> None:
        """Store ``chunk`` under ``key`` in every tier (now, or the slower ones from the write-back queue)."""
        check_key(key)
        expires_at = expiry_time(ttl_s)
        if self._queue is None:
            self._write(key, chunk, expires_at, self.tiers)
            return
        self.tiers[0].put(key, chunk, ttl_s=ttl_s)
        with self._write_lock:
            self._pending[key] = (chunk, expires_at)
        self._queue.put(key)  # blocks while the queue is full: back-pressure instead of unbounded memory

    def put_blob(self, key: str, blob: bytes, ttl_s: float | None = None) -> None:
        """Store a container blob (validated first; ``CorruptEntry`` if it is not one)."""
        check_key(key)
        header = read_header(blob)
        expires_at = expiry_time(ttl_s) if ttl_s is not None else header.expires_at
        if expires_at != header.expires_at:
            blob = with_expiry(blob, expires_at)
        chunk: ChunkKV | None = None
        for tier in self.tiers:
            if tier.holds_encoded and _same_codec(tier, header):
                tier.put_blob(key, blob)
            else:
                if chunk is None:
                    chunk = decode_entry(blob)[1]
                tier.put(key, chunk, ttl_s=_remaining(expires_at))

    def put_many(self, items: Iterable[tuple[str, ChunkKV]], ttl_s: float | None = None) -> None:
        for key, chunk in items:
            self.put(key, chunk, ttl_s=ttl_s)

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._write_lock:
            removed = self._pending.pop(key, None) is not None
            for tier in self.tiers:
                removed = tier.delete(key) or removed
        return removed

    def delete_many(self, keys: Iterable[str]) -> int:
        return sum(1 for k in keys if self.delete(k))

    def pin(self, key: str) -> None:
        """Never evict ``key`` from any tier (also for copies promoted later)."""
        for tier in self.tiers:
            tier.pin(key)

    def unpin(self, key: str) -> None:
        for tier in self.tiers:
            tier.unpin(key)

    def promote(self, key: str, chunk: ChunkKV, from_tier: str, expires_at: float | None = None) -> None:
        """Copy ``chunk``, which a caller read from tier ``from_tier`` and decoded itself (e.g. layer by layer),
        into the faster tiers, as ``get`` would have; counted as a promotion."""
        check_key(key)
        if from_tier not in self.names:
            raise ConfigError(f"unknown tier {from_tier!r}; this store has {self.names}")
        self._promote(key, self.names.index(from_tier), chunk, None, expires_at)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the write-back queue is drained; True when it is."""
        if self._queue is None:
            return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    # -- internals ---------------------------------------------------------------------------------------
    def _write(self, key: str, chunk: ChunkKV, expires_at: float | None, tiers: Sequence[Tier]) -> None:
        blobs: dict[tuple[str, str], bytes] = {}  # encode once per distinct codec configuration
        ttl_s = _remaining(expires_at)
        if expires_at is not None and ttl_s is None:
            return  # already expired
        for tier in tiers:
            if tier.holds_encoded:
                sig = _codec_signature(tier)
                blob = blobs.get(sig)
                if blob is None:
                    blob = blobs[sig] = encode_entry(chunk, tier.codec, expires_at)
                tier.put_blob(key, blob)
            else:
                tier.put(key, chunk, ttl_s=ttl_s)

    def _write_back_loop(self) -> None:
        assert self._queue is not None
        while True:
            key = self._queue.get()
            try:
                if key is _STOP:
                    return
                with self._write_lock:
                    pending = self._pending.get(key)
                    if pending is not None:
                        try:
                            self._write(key, pending[0], pending[1], self.tiers[1:])
                        except CorruptEntry as exc:  # cannot happen for our own encodings; keep the worker alive
                            log.error("write-back of %s failed: %s", key, exc)
                            self._count(writeback_dropped=1)
                        if self._pending.get(key) is pending:
                            del self._pending[key]
            finally:
                self._queue.task_done()

    def _promote(self, key: str, hit_index: int, chunk: ChunkKV, blob: bytes | None, expires_at: float | None) -> None:
        if not self.config.promote or hit_index == 0:
            return
        ttl_s = _remaining(expires_at)
        if expires_at is not None and ttl_s is None:
            return
        for tier in self.tiers[:hit_index]:
            if tier.holds_encoded and blob is not None and _codec_signature(tier) == _codec_signature(
                    self.tiers[hit_index]):
                tier.put_blob(key, blob)
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
            "tiers": {name: tier.describe() for name, tier in zip(self.names, self.tiers)},
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._queue is not None and self._worker is not None:
            self.flush()
            self._queue.put(_STOP)
            self._worker.join()
        self._pool.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TieredStore({', '.join(self.names)}; {self.config.write_policy})"


def tier_expiry(tier: Tier, key: str) -> float | None:
    expiry = getattr(tier, "expiry", None)
    return expiry(key) if expiry is not None else None


def _remaining(expires_at: float | None) -> float | None:
    if expires_at is None:
        return None
    left = expires_at - time.time()
    return left if left > 0 else None


def _codec_signature(tier: Tier) -> tuple[str, str]:
    return tier.codec.name, json.dumps(tier.codec.params.to_dict(), sort_keys=True)


def _same_codec(tier: Tier, header: Any) -> bool:
    return _codec_signature(tier) == (header.codec, json.dumps(header.params, sort_keys=True))


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
