"""Async forms of the store operations, for asyncio applications (FastAPI handlers, async LangChain chains).

Every tier and ``TieredStore`` has them: ``aget``, ``aget_many``, ``aput``, ``adelete``, ``acontains``. Each runs
its blocking operation on a worker thread (``asyncio.to_thread``), so the event loop never waits on a disk read,
a Redis round trip or a decode; concurrent calls overlap as the blocking ones do from threads (the store is
thread-safe). The Redis tier overrides them with native asyncio I/O (``redis_async.RedisAsyncAPI``: one
``redis.asyncio`` client per event loop; decoding still off the loop), and a ``TieredStore`` with such a
tier reads it natively (``store_async.TieredAsyncAPI``).
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ragkv.kvstore.chunk import ChunkKV


class AsyncStoreAPI:
    """Mixed into tiers and ``TieredStore``: async forms of ``get``, ``get_many``, ``put``, ``delete``, ``contains``."""

    async def aget(self, key: str) -> ChunkKV | None:
        return await asyncio.to_thread(self.get, key)  # type: ignore[attr-defined]

    async def aget_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        return await asyncio.to_thread(self.get_many, list(keys))  # type: ignore[attr-defined]

    async def aput(self, key: str, chunk: ChunkKV, ttl_s: float | None = None) -> None:
        await asyncio.to_thread(self.put, key, chunk, ttl_s)  # type: ignore[attr-defined]

    async def adelete(self, key: str) -> bool:
        return await asyncio.to_thread(self.delete, key)  # type: ignore[attr-defined]

    async def acontains(self, key: str) -> bool:
        return await asyncio.to_thread(self.contains, key)  # type: ignore[attr-defined]


__all__ = ["AsyncStoreAPI"]
