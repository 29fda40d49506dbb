"""Native asyncio forms of the Redis tier's operations (redis-py's ``redis.asyncio`` client).

``RedisAsyncAPI`` is mixed into ``RedisTier`` ahead of the thread-offload forms every tier has: ``aget``,
``aget_many``, ``aput``, ``adelete`` and ``acontains`` talk to Redis on the caller's event loop, so a
thousand concurrent lookups need no thousand threads. What costs CPU — decoding and checking a blob,
encoding a chunk — still runs on a worker thread, so the loop never stalls on a large value either.

An asyncio client belongs to the event loop that made it: the tier keeps one per loop (dropped with the
loop). The same breaker and error boundary as the blocking path apply: a down or refusing server is a miss,
a dropped write, ``False``.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ragkv.kvstore.chunk import ChunkKV, check_key
from ragkv.kvstore.errors import TierUnavailable
from ragkv.kvstore.tiers.redis_client import BATCH_KEYS, RedisConfig

_log = logging.getLogger(__name__)
T = TypeVar("T")


def make_async_client(redis: Any, config: RedisConfig) -> Any:
    """A ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` for ``config`` (nothing connects yet)."""
    address = config.address
    common: dict[str, Any] = {"socket_timeout": config.socket_timeout_s,
                              "socket_connect_timeout": config.connect_timeout_s,
                              "username": address.username, "password": address.password}
    if address.tls:
        common.update(ssl=True, ssl_ca_certs=config.tls_ca_file, ssl_certfile=config.tls_cert_file,
                      ssl_keyfile=config.tls_key_file, ssl_cert_reqs="required", ssl_check_hostname=True)
    (host, port), *others = address.nodes
    if not address.cluster:
        # no retries inside redis-py: the tier's breaker decides when to try again (as on the blocking path)
        return redis.asyncio.Redis(host=host, port=port, db=address.db,
                                   retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0), **common)
    cluster = redis.asyncio.cluster
    return cluster.RedisCluster(host=host, port=port, startup_nodes=[cluster.ClusterNode(h, p) for h, p in others],
                                **common)


class RedisAsyncAPI:
    """Async forms for ``RedisTier`` (which provides ``_redis``, ``_guarded``, ``_rkey``, ``_accept_chunk``,
    ``_encoded``, ``_remember``, ``_forget``, ``stats``, ``config``)."""

    _aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]

    def _async_client(self) -> Any:
        loop = asyncio.get_running_loop()
        clients = self.__dict__.setdefault("_aclients", weakref.WeakKeyDictionary())
        client = clients.get(loop)
        if client is None:
            client = clients[loop] = make_async_client(self._redis, self.config)  # type: ignore[attr-defined]
        return client

    async def _arun(self, op: str, action: Callable[[Any], Awaitable[T]]) -> T:
        """One async backend call under the tier's breaker (``RedisTier._guarded``)."""
        with self._guarded(op):  # type: ignore[attr-defined]
            return await action(self._async_client())

    async def _aor(self, op: str, action: Callable[[Any], Awaitable[T]], fallback: T) -> T:
        try:
            return await self._arun(op, action)
        except TierUnavailable as exc:
            _log.debug("%s", exc)
            self.stats.add(errors=1)  # type: ignore[attr-defined]
            return fallback

    async def _accept(self, key: str, blob: bytes | None) -> ChunkKV | None:
        tier: Any = self
        if blob is None:
            return tier._accept_chunk(key, None)
        return await asyncio.to_thread(tier._accept_chunk, key, blob)  # decode and checks: CPU, off the loop

    async def aget(self, key: str) -> ChunkKV | None:
        rkey = self._rkey(check_key(key))  # type: ignore[attr-defined]
        return await self._accept(key, await self._aor("get", lambda c: c.get(rkey), None))

    async def aget_blob(self, key: str) -> bytes | None:
        """The container blob, framing and header checked (the caller decodes it), or None."""
        tier: Any = self
        rkey = tier._rkey(check_key(key))
        blob = await self._aor("get", lambda c: c.get(rkey), None)
        if blob is None:
            return tier._accept_blob(key, None)
        return await asyncio.to_thread(tier._accept_blob, key, blob)

    async def aget_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        keys = [check_key(k) for k in keys]
        blobs: list[bytes | None] = [None] * len(keys)
        for lo in range(0, len(keys), BATCH_KEYS):
            part = keys[lo:lo + BATCH_KEYS]

            async def fetch(client: Any, part: list[str] = part) -> list[Any]:
                pipe = client.pipeline(transaction=False) if not self.config.address.cluster else client.pipeline()  # type: ignore[attr-defined]
                for key in part:
                    pipe.get(self._rkey(key))  # type: ignore[attr-defined]
                return list(await pipe.execute())

            replies = await self._aor("get_many", fetch, None)
            if replies is None:
                self.stats.add(errors=len(part) - 1)  # type: ignore[attr-defined]  # one per key, as the blocking path
            for i, blob in enumerate(replies or [None] * len(part)):
                blobs[lo + i] = blob
        return list(await asyncio.gather(*(self._accept(k, b) for k, b in zip(keys, blobs, strict=True))))

    async def acontains(self, key: str) -> bool:
        rkey = self._rkey(check_key(key))  # type: ignore[attr-defined]
        return bool(await self._aor("contains", lambda c: c.exists(rkey), 0))

    async def adelete(self, key: str) -> bool:
        tier: Any = self
        rkey = tier._rkey(check_key(key))
        tier._forget(key)
        removed = bool(await self._aor("delete", lambda c: c.delete(rkey), 0))
        if removed:
            tier.stats.add(deletes=1)
        return removed

    async def aput(self, key: str, chunk: ChunkKV, ttl_s: float | None = None) -> None:
        tier: Any = self
        check_key(key)
        _, blob, ttl = await asyncio.to_thread(tier._encoded, key, chunk, ttl_s)  # encode: CPU, off the loop
        if len(blob) > tier.config.max_value_bytes:
            tier.stats.add(evictions=1)
            await self.adelete(key)  # the old value must never be served after a newer write
            return
        px = None if ttl is None else max(1, int(ttl * 1000))
        rkey = tier._rkey(key)
        if await self._aor("put", lambda c: c.set(rkey, blob, px=px), None) is None:
            return  # a cache write that fails is a future miss, not the caller's problem
        tier.stats.add(puts=1, bytes_in=len(blob))
        tier._remember(key, len(blob))

    def close_async_clients(self) -> None:
        """Close the asyncio clients whose loops still run; the others went with their loops."""
        clients = self.__dict__.pop("_aclients", None) or {}
        for loop, client in list(clients.items()):
            if loop.is_running() and not loop.is_closed():
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)


__all__ = ["RedisAsyncAPI", "make_async_client"]
