"""The chunk routes of the service: PUT/GET/HEAD/DELETE ``/v1/chunks/{key}`` and ``POST /v1/chunks/lookup``.

A PUT is checked against the served model and the key (``RagRuntime.check_blob``) and the tenant's quota,
then stored as it came: the blob is never decoded on the way in. Reads stream large blobs in slices.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse

from ragkv.integrations.answers import Forbidden, NotFound
from ragkv.integrations.metrics import Metrics
from ragkv.integrations.runtime import RagRuntime
from ragkv.integrations.service_deps import KeyParam, TenantDep, checked_key, error_responses
from ragkv.integrations.service_http import ServiceLimits
from ragkv.integrations.service_models import ChunkPutResponse, LookupRequest, LookupResponse, LookupResult
from ragkv.integrations.tenants import QuotaCheck, Tenant
from ragkv.kvstore import ConfigError, key_namespace, read_header

DOWNLOAD_SLICE = 4 << 20  # blobs up to this size go out in one piece (no copy); larger ones stream


def add_chunk_routes(app: FastAPI, runtime: RagRuntime, metrics: Metrics, quotas: QuotaCheck,
                     limits: ServiceLimits, upload_slots: asyncio.Semaphore) -> None:
    @app.put("/v1/chunks/{key}", status_code=201, response_model=ChunkPutResponse, tags=["chunks"],
             summary="Store a chunk's container blob", responses=error_responses(401, 403, 413, 415, 422),
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}}})
    async def put_chunk(request: Request, key: KeyParam, tenant: TenantDep,
                        ttl_s: Annotated[float | None, Query(gt=0, le=10 * 365 * 86400)] = None) -> ChunkPutResponse:
        key = checked_key(key)
        if not tenant.can_write(key):
            raise Forbidden(f"namespace of {key} is not writable with this API key (blobs go into 'shared' only "
                            "with the admin role; publish shared chunks from text with /v1/warm)")
        async with upload_slots:
            blob = await request.body()

            def store() -> Any:
                # checksum, header and limits first (CorruptEntry -> 422), then what this server would store
                # under this key; the blob is stored as it is (decoded afterwards only for its abstract, when
                # abstracts are on).
                header = read_header(blob, runtime.store.limits, key)
                runtime.check_blob(key, header)
                quotas.check_write(tenant, key_namespace(key), len(blob))
                runtime.store.put_blob(key, blob, ttl_s=ttl_s)
                runtime.chunk_uploaded(key, blob, header.meta.token_ids, ttl_s)
                return header

            header = await anyio.to_thread.run_sync(store)  # checksums of large blobs stay off the event loop
        metrics.add_chunk_bytes("received", len(blob), tenant.name)
        return ChunkPutResponse(key=key, bytes=len(blob), tokens=len(header.meta.token_ids), codec=header.codec)

    def _readable(tenant: Tenant, key: str) -> str:
        key = checked_key(key)
        if not tenant.can_read(key):
            raise Forbidden(f"namespace of {key} is not readable with this API key")
        return key

    @app.get("/v1/chunks/{key}", tags=["chunks"], summary="Download a chunk's container blob",
             response_class=Response, responses={200: {"content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}, "description": "The container blob"},
                 **error_responses(401, 403, 404, 422)})
    async def get_chunk(key: KeyParam, tenant: TenantDep) -> Response:
        key = _readable(tenant, key)
        blob = await anyio.to_thread.run_sync(runtime.store.get_blob, key)
        if blob is None:
            raise NotFound(f"chunk {key} is not in the store")
        metrics.add_chunk_bytes("sent", len(blob), tenant.name)

        async def body() -> AsyncIterator[bytes]:
            if len(blob) <= DOWNLOAD_SLICE:
                yield blob
                return
            view = memoryview(blob)
            for start in range(0, len(blob), DOWNLOAD_SLICE):
                yield bytes(view[start:start + DOWNLOAD_SLICE])

        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"Content-Length": str(len(blob))})

    @app.head("/v1/chunks/{key}", tags=["chunks"], summary="Whether a chunk is stored, its size and tier",
              response_class=Response, responses=error_responses(401, 403, 404, 422))
    async def head_chunk(key: KeyParam, tenant: TenantDep) -> Response:
        key = _readable(tenant, key)

        def look() -> tuple[str | None, int | None]:
            tier = runtime.store.locate(key)
            blob = runtime.store.get_blob(key) if tier is not None else None
            return tier, None if blob is None else len(blob)

        tier, size = await anyio.to_thread.run_sync(look)
        if tier is None or size is None:
            return Response(status_code=404)
        return Response(status_code=200, media_type="application/octet-stream",
                        headers={"Content-Length": str(size), "X-Ragkv-Tier": tier})

    @app.delete("/v1/chunks/{key}", status_code=204, tags=["chunks"], summary="Delete a chunk from every tier",
                response_class=Response, responses=error_responses(401, 403, 404, 422))
    async def delete_chunk(key: KeyParam, tenant: TenantDep) -> Response:
        key = checked_key(key)
        if not tenant.can_delete(key):
            raise Forbidden(f"chunks of {key.split(':')[0]!r} cannot be deleted with this API key")
        removed = await anyio.to_thread.run_sync(runtime.delete_chunk, key)
        if not removed:
            raise NotFound(f"chunk {key} is not in the store")
        return Response(status_code=204)

    @app.post("/v1/chunks/lookup", response_model=LookupResponse, tags=["chunks"],
              summary="Which keys are stored, and in which tier", responses=error_responses(401, 403, 413, 415, 422))
    async def lookup(body: LookupRequest, tenant: TenantDep) -> LookupResponse:
        if len(body.keys) > limits.max_lookup_keys:
            raise ConfigError(f"{len(body.keys)} keys; the limit is {limits.max_lookup_keys}")
        keys = [_readable(tenant, k) for k in body.keys]
        tiers = await anyio.to_thread.run_sync(lambda: [runtime.store.locate(k) for k in keys])
        return LookupResponse(results=[LookupResult(key=k, present=t is not None, tier=t) for k, t in zip(keys, tiers)])


__all__ = ["DOWNLOAD_SLICE", "add_chunk_routes"]
