"""``TieredStore``'s async lookup: native async I/O for tiers that have it (Redis), threads for the rest.

With no natively async tier, ``aget`` is the blocking ``get`` on a worker thread (``AsyncStoreAPI``). With
one (a Redis tier), ``aget`` answers a write-back or first-tier hit inline (memory: no thread), reads the
slower tiers in order — a Redis tier on the event loop (``aget_blob``), disk on a worker thread — decodes on a
worker thread, and promotes the hit into the faster tiers. The read runs without the key's lock (a lock held
across an ``await`` would block the loop), so promotion checks under the lock that the key was neither
written nor deleted since the read began (``_promote_unless_changed``): the faster tiers never get an older
value, and the value returned was current when it was read.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ragkv.kvstore.async_api import AsyncStoreAPI
from ragkv.kvstore.chunk import check_key

if TYPE_CHECKING:
    from ragkv.kvstore.chunk import ChunkKV


class TieredAsyncAPI(AsyncStoreAPI):
    """Mixed into ``TieredStore`` (which provides ``tiers``, ``_fast_hit``, ``_read``, ``_decode_read``,
    ``_generation``, ``_promote_unless_changed``, ``_count``, ``_check_open``)."""

    async def aget(self, key: str) -> ChunkKV | None:
        store: Any = self
        check_key(key)
        store._check_open()
        if not any(t.native_async for t in store.tiers):
            return await asyncio.to_thread(store.get, key)
        chunk = store._fast_hit(key)
        if chunk is not None:
            return chunk
        generation = store._generation(key)
        for i, tier in enumerate(store.tiers):
            if i == 0 and not tier.holds_encoded:
                continue  # checked by _fast_hit
            if tier.native_async:
                blob = await tier.aget_blob(key)
                found = None if blob is None else await asyncio.to_thread(store._decode_read, tier, key, blob)
            else:
                found = await asyncio.to_thread(store._read, tier, key)
            if found is not None:
                if i:
                    await asyncio.to_thread(store._promote_unless_changed, key, i, *found, generation)
                store._count(hits=1)
                return found[0]
        store._count(misses=1)
        return None

    async def aget_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        if not any(t.native_async for t in self.tiers):  # type: ignore[attr-defined]
            return await super().aget_many(keys)
        return list(await asyncio.gather(*(self.aget(k) for k in keys)))


__all__ = ["TieredAsyncAPI"]
