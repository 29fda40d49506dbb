"""``redis`` tier: container blobs in one Redis server or a Redis Cluster, the scale-out tier.

Each entry is ONE Redis key, ``key_prefix + "<namespace>:<name>"``, holding the whole container blob, so a
reader can never see a header from one write and a payload from another. Redis owns expiry (``SET ... PX``)
and eviction (its own ``maxmemory-policy``): ``capacity_bytes`` is not enforced here, and ``pin`` changes
nothing in Redis (pin and TTL are independent; spare persistent keys with a ``volatile-*`` policy).

A cache that is down must cost no more than a miss. Backend errors are translated at this boundary into
``TierUnavailable`` and then into the miss: ``get`` -> None, ``put`` -> dropped (counted in
``stats.errors``), ``delete``/``contains`` -> False, ``keys`` -> empty. A circuit breaker stops us from
paying a connect or read timeout on every request while the server is away.

redis-py is imported only when a ``RedisTier`` is built, so ``ragkv.kvstore`` loads without the extra.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from ragkv.kvstore.artefacts import ARTEFACT_KEY, MAX_ARTEFACT_BYTES, check_digest
from ragkv.kvstore.chunk import ChunkKV, check_key, check_namespace
from ragkv.kvstore.container import KEEP, decode_entry, encode_entry, read_header, rewrite_header
from ragkv.kvstore.errors import ConfigError, CorruptEntry, TierUnavailable
from ragkv.kvstore.policy import ExponentialBackoff
from ragkv.kvstore.tiers.base import Tier, expiry_time, register_tier
from ragkv.kvstore.tiers.redis_async import RedisAsyncAPI
from ragkv.kvstore.tiers.redis_breaker import CircuitBreaker
from ragkv.kvstore.tiers.redis_client import (
    RedisConfig,
    close_client,
    import_redis,
    make_client,
    pipeline_batches,
    redact_url,
)

_log = logging.getLogger(__name__)

T = TypeVar("T")

_SCAN_COUNT = 1000


@register_tier
class RedisTier(RedisAsyncAPI, Tier):
    """Container blobs in Redis / Redis Cluster; a down server is a miss, never an exception.

    ``used_bytes`` is cheap and approximate on purpose: the bytes this process wrote and has not deleted
    (a key seen missing on read is forgotten). Redis-side expiry and eviction, and other writers, are not
    seen; ask Redis (``INFO memory``) for the truth. TTLs are Redis' (``PX``), set from ``ttl_s`` or
    ``default_ttl_s``; the blob header carries the same ``expires_at`` so it survives a move to another
    tier; here Redis decides expiry, pinned or not. Batched operations are pipelined (per node on a cluster; redis-py routes each command by
    slot).
    """

    kind = "redis"
    native_async = True
    config_class = RedisConfig
    holds_encoded = True
    config: RedisConfig

    def __init__(self, config: RedisConfig) -> None:
        super().__init__(config)
        self._redis = import_redis()
        exceptions = self._redis.exceptions
        # Errors that say "the backend is not there": they feed the breaker. ClusterDownError is also a
        # ResponseError, so this tuple is checked first.
        self._unreachable: tuple[type[BaseException], ...] = (
            exceptions.ConnectionError, exceptions.TimeoutError, exceptions.ClusterError,
            exceptions.RedisClusterException, OSError,
        )
        # Any other RedisError: the server answered, but refused (OOM, READONLY, ...).
        self._refused: type[BaseException] = exceptions.RedisError
        self._address = config.address
        self._prefix = config.key_prefix
        self._client: Any = None
        self._connect_lock = threading.Lock()  # not self._lock: building a cluster client can take a while
        self._closed = False
        self._sizes: dict[str, int] = {}
        self._used = 0
        self._breaker = CircuitBreaker(
            f"redis tier {redact_url(config.url)}",
            config.breaker_failures,
            ExponentialBackoff(config.breaker_backoff_base_s, config.breaker_backoff_cap_s),
            logger=_log,
        )

    # -- connection and the error boundary ---------------------------------------------------------------
    def _connect(self) -> Any:
        """Build the client on first use: a RedisCluster connects while it is constructed, and a tier
        pointed at a server that is down at start-up must still construct (and miss)."""
        with self._connect_lock:
            if self._client is None:
                self._client = make_client(self._redis, self.config)
            return self._client

    @contextmanager
    def _guarded(self, op: str) -> Iterator[None]:
        """One backend call (blocking or async) under the breaker; every backend failure leaves as
        ``TierUnavailable``."""
        if self._closed:
            raise TierUnavailable(f"redis tier is closed; {op} skipped")
        if not self._breaker.allow():
            raise TierUnavailable(f"redis circuit is open; {op} skipped")
        settled = False
        try:
            yield
            self._breaker.record_success()
            settled = True
        except self._unreachable as exc:
            self._breaker.record_failure(exc)
            settled = True
            raise TierUnavailable(f"redis {op} failed: {exc}") from exc
        except self._refused as exc:
            self._breaker.record_success()  # it answered: reachable, just unwilling
            settled = True
            raise TierUnavailable(f"redis {op} refused: {exc}") from exc
        finally:
            if not settled:
                self._breaker.release()

    def _run(self, op: str, action: Callable[[Any], T]) -> T:
        """Run one blocking backend call under the breaker (``_guarded``)."""
        with self._guarded(op):
            return action(self._connect())

    def _rkey(self, key: str) -> str:
        return self._prefix + key

    def _pipelined(
        self, op: str, keys: Sequence[str], command: Callable[[Any, int], Any],
        sizes: Sequence[int] | None = None,
    ) -> list[tuple[list[int], list[Any] | None]]:
        """Run ``command(pipe, index)`` for every key, batch by batch; a batch that fails is (indexes, None)
        and counts one error per key."""
        results: list[tuple[list[int], list[Any] | None]] = []
        for batch in pipeline_batches(self._redis, self._client, self._address.cluster,
                                      [self._rkey(k) for k in keys], sizes):
            def run(client: Any, batch: list[int] = batch) -> list[Any]:
                if len(batch) == 1:
                    return [command(client, batch[0])]
                pipe = client.pipeline(transaction=False)
                for i in batch:
                    command(pipe, i)
                return list(pipe.execute())

            try:
                results.append((batch, self._run(op, run)))
            except TierUnavailable as exc:
                _log.debug("%s", exc)
                self.stats.add(errors=len(batch))
                results.append((batch, None))
        return results

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _remember(self, key: str, nbytes: int) -> None:
        with self._lock:
            self._used += nbytes - self._sizes.get(key, 0)
            self._sizes[key] = nbytes

    def _forget(self, key: str) -> None:
        with self._lock:
            self._used -= self._sizes.pop(key, 0)

    def _ttl_for(self, ttl_s: float | None) -> float | None:
        return ttl_s if ttl_s is not None else self.config.default_ttl_s

    # -- reads -------------------------------------------------------------------------------------------
    def _fetch(self, key: str) -> bytes | None:
        rkey = self._rkey(key)
        try:
            return self._run("get", lambda client: client.get(rkey))
        except TierUnavailable as exc:
            _log.debug("%s", exc)
            self.stats.add(errors=1)
            return None

    def _fetch_many(self, keys: Sequence[str]) -> list[bytes | None]:
        rkeys = [self._rkey(k) for k in keys]
        blobs: list[bytes | None] = [None] * len(keys)
        for batch, replies in self._pipelined("get_many", keys, lambda pipe, i: pipe.get(rkeys[i])):
            for i, blob in zip(batch, replies or [None] * len(batch), strict=True):
                blobs[i] = blob
        return blobs

    def _accept_chunk(self, key: str, blob: bytes | None) -> ChunkKV | None:
        if blob is None:
            self._forget(key)
            self.stats.add(misses=1)
            return None
        try:
            _, chunk = decode_entry(blob, self.limits, key)
        except CorruptEntry as exc:
            self._discard_corrupt(key, exc)
            return None
        self.stats.add(hits=1, bytes_out=len(blob))
        return chunk

    def _accept_blob(self, key: str, blob: bytes | None) -> bytes | None:
        if blob is None:
            self._forget(key)
            self.stats.add(misses=1)
            return None
        try:
            read_header(blob, self.limits, key)  # framing, checksum, header; the next reader decodes the payload
        except CorruptEntry as exc:
            self._discard_corrupt(key, exc)
            return None
        self.stats.add(hits=1, bytes_out=len(blob))
        return blob

    def _discard_corrupt(self, key: str, exc: CorruptEntry) -> None:
        """A blob that fails validation is deleted and reported as a miss. (Should another writer replace
        it between our GET and this DEL, we delete a good entry: a later miss, never wrong data.)"""
        _log.warning("redis tier: corrupt entry %r deleted (%s)", key, exc)
        self.stats.add(corrupt=1, misses=1)
        self._forget(key)
        rkey = self._rkey(key)
        try:
            self._run("delete", lambda client: client.delete(rkey))
        except TierUnavailable as unavailable:
            _log.debug("%s", unavailable)
            self.stats.add(errors=1)

    def get(self, key: str) -> ChunkKV | None:
        check_key(key)
        with self.stats.timed("get"):
            return self._accept_chunk(key, self._fetch(key))

    def get_blob(self, key: str) -> bytes | None:
        check_key(key)
        with self.stats.timed("get"):
            return self._accept_blob(key, self._fetch(key))

    def get_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        keys = [check_key(k) for k in keys]
        with self.stats.timed("get"):  # one sample per call: the pipeline is one round trip per batch
            blobs = self._fetch_many(keys)
            return [self._accept_chunk(k, b) for k, b in zip(keys, blobs, strict=True)]

    def get_many_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = [check_key(k) for k in keys]
        with self.stats.timed("get"):
            blobs = self._fetch_many(keys)
            return [self._accept_blob(k, b) for k, b in zip(keys, blobs, strict=True)]

    def contains(self, key: str) -> bool:
        rkey = self._rkey(check_key(key))
        try:
            return bool(self._run("contains", lambda client: client.exists(rkey)))
        except TierUnavailable as exc:
            _log.debug("%s", exc)
            self.stats.add(errors=1)
            return False

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        keys = [check_key(k) for k in keys]
        rkeys = [self._rkey(k) for k in keys]
        found = [False] * len(keys)
        # One key per EXISTS: a multi-key EXISTS must not span cluster slots.
        for batch, replies in self._pipelined("contains_many", keys, lambda pipe, i: pipe.exists(rkeys[i])):
            for i, n in zip(batch, replies or [0] * len(batch), strict=True):
                found[i] = bool(n)
        return found

    def keys(self, namespace: str | None = None) -> Iterator[str]:
        """Store keys under our prefix (one namespace, or all), by SCAN on every master of a cluster.

        Collected eagerly so a connection lost half-way is a short answer here, not an exception raised
        later in the caller's loop.
        """
        pattern = self._prefix + ("*" if namespace is None else check_namespace(namespace) + ":*")
        cluster = self._address.cluster

        def scan(client: Any) -> list[bytes]:
            if cluster:
                return list(client.scan_iter(match=pattern, count=_SCAN_COUNT,
                                             target_nodes=self._redis.cluster.RedisCluster.PRIMARIES))
            return list(client.scan_iter(match=pattern, count=_SCAN_COUNT))

        try:
            raw = self._run("keys", scan)
        except TierUnavailable as exc:
            _log.debug("%s", exc)
            self.stats.add(errors=1)
            return iter(())
        prefix = self._prefix.encode()
        found: list[str] = []
        for rkey in dict.fromkeys(raw):  # SCAN may return a key twice
            if not rkey.startswith(prefix):
                continue
            try:
                found.append(check_key(rkey[len(prefix):].decode("ascii")))
            except (UnicodeDecodeError, ConfigError):
                continue  # someone else's key under our prefix
        return iter(found)

    # -- writes ------------------------------------------------------------------------------------------
    def _store_many(self, entries: Sequence[tuple[str, bytes, float | None]]) -> None:
        """SET each (key, blob, ttl) with ``PX``; a batch that fails is dropped and counted in errors."""
        fitting: list[tuple[str, bytes, float | None]] = []
        for key, blob, ttl_s in entries:
            if len(blob) > self.config.max_value_bytes:
                _log.debug("redis tier: %r is %d bytes > max_value_bytes; not stored", key, len(blob))
                self.stats.add(evictions=1)
                self.delete(key)  # the old value must never be served after a newer write
            else:
                fitting.append((key, blob, ttl_s))

        def set_one(pipe: Any, i: int) -> Any:
            key, blob, ttl_s = fitting[i]
            return pipe.set(self._rkey(key), blob, px=_ttl_ms(ttl_s))

        keys = [key for key, _, _ in fitting]
        sizes = [len(blob) for _, blob, _ in fitting]
        for batch, replies in self._pipelined("put", keys, set_one, sizes):
            if replies is None:
                continue  # a cache write that fails is a future miss, not the caller's problem
            self.stats.add(puts=len(batch), bytes_in=sum(sizes[i] for i in batch))
            for i in batch:
                self._remember(keys[i], sizes[i])

    def _encoded(self, key: str, chunk: ChunkKV, ttl_s: float | None) -> tuple[str, bytes, float | None]:
        ttl = self._ttl_for(ttl_s)
        return key, encode_entry(chunk, self.codec, expiry_time(ttl), key), ttl

    def put(self, key: str, chunk: ChunkKV, ttl_s: float | None = None) -> None:
        check_key(key)
        with self.stats.timed("put"):
            self._store_many([self._encoded(key, chunk, ttl_s)])

    def put_many(self, items: Iterable[tuple[str, ChunkKV]], ttl_s: float | None = None) -> None:
        with self.stats.timed("put"):
            self._store_many([self._encoded(check_key(k), c, ttl_s) for k, c in items])

    def put_blob(self, key: str, blob: bytes, ttl_s: float | None = None) -> None:
        """Store a container blob as is. An invalid blob raises ``CorruptEntry``: that is the caller's bug,
        not a backend failure. Without ``ttl_s`` the blob keeps the expiry its header carries."""
        check_key(key)
        header, data = rewrite_header(blob, key=key, limits=self.limits,
                                      expires_at=KEEP if ttl_s is None else expiry_time(ttl_s))
        ttl = ttl_s
        if ttl is None and header.expires_at is not None:
            ttl = header.expires_at - time.time()
            if ttl <= 0:
                self.stats.add(expired=1)
                self.delete(key)  # already dead: the old value must not stay either
                return
        elif ttl is None and self.config.default_ttl_s is not None:
            ttl = self.config.default_ttl_s
            data = rewrite_header(data, key=key, limits=self.limits, expires_at=expiry_time(ttl))[1]
        with self.stats.timed("put"):
            self._store_many([(key, data, ttl)])

    def delete(self, key: str) -> bool:
        check_key(key)
        rkey = self._rkey(key)
        self._forget(key)
        try:
            removed = bool(self._run("delete", lambda client: client.delete(rkey)))
        except TierUnavailable as exc:
            _log.debug("%s", exc)
            self.stats.add(errors=1)
            return False
        if removed:
            self.stats.add(deletes=1)
        return removed

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = [check_key(k) for k in keys]
        rkeys = [self._rkey(k) for k in keys]
        for key in keys:
            self._forget(key)
        removed = 0
        for _, replies in self._pipelined("delete_many", keys, lambda pipe, i: pipe.delete(rkeys[i])):
            removed += sum(int(n) for n in replies or [])
        self.stats.add(deletes=removed)
        return removed

    # -- artefacts: <prefix>+artefact:<digest>, no TTL, outside every namespace --------------------------------
    def write_artefact(self, digest: str, data: bytes) -> None:
        rkey = self._prefix + ARTEFACT_KEY + check_digest(digest)
        self._run("set artefact", lambda client: client.set(rkey, data))

    def read_artefact(self, digest: str) -> bytes | None:
        """The artefact, or None; its length is asked first so that nothing over the limit is fetched."""
        rkey = self._prefix + ARTEFACT_KEY + check_digest(digest)
        size = self._run("strlen artefact", lambda client: client.strlen(rkey))
        if not size or size > MAX_ARTEFACT_BYTES:
            return None
        data = self._run("get artefact", lambda client: client.get(rkey))
        return None if data is None or len(data) > MAX_ARTEFACT_BYTES else bytes(data)

    # -- misc --------------------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": redact_url(self.config.url), "circuit": self._breaker.state}

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    def close(self) -> None:
        """Close every pooled connection (each node's pool on a cluster). Later operations are misses."""
        with self._connect_lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            close_client(client, self._address.cluster)
        self.close_async_clients()


def _ttl_ms(ttl_s: float | None) -> int | None:
    return None if ttl_s is None else max(1, int(ttl_s * 1000))
