"""``RagkvClient``: a small sync + async HTTP client for the ragkv REST service (httpx).

Why it exists: the LangChain and LlamaIndex adapters and ``ragkv ask --url`` talk to a running service the
same way they talk to an in-process runtime; this is the one place that knows the wire format (JSON bodies,
server-sent events for streaming, container blobs for chunks).
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

try:
    import httpx
except ImportError as exc:  # pragma: no cover - part of the service extra
    raise ImportError("the ragkv HTTP client needs httpx: pip install 'ragkv[service]'") from exc

from typing_extensions import Self

from ragkv.kvstore.errors import RagKVError


class RagkvHTTPError(RagKVError):
    """The service answered with an error status; ``status`` and ``detail`` say which and why."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class ServiceUnreachable(RagKVError):
    """The service could not be reached (refused, timed out, name not resolved)."""


class _ReportingTransport(httpx.BaseTransport):
    """Turns httpx's connection errors into ``ServiceUnreachable``, one line naming the URL."""

    def __init__(self, inner: httpx.BaseTransport, base_url: str) -> None:
        self.inner = inner
        self.base_url = base_url

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return self.inner.handle_request(request)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"cannot reach the ragkv service at {self.base_url}: "
                                     f"{exc or type(exc).__name__}") from exc

    def close(self) -> None:
        self.inner.close()


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = response.text[:500]
    raise RagkvHTTPError(response.status_code, detail)


class _EventParser:
    """Incremental server-sent event parser: feed lines, get (event, data) when an event completes."""

    def __init__(self) -> None:
        self.event: str = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            done = (self.event, "\n".join(self.data)) if self.data else None
            self.event, self.data = "message", []
            return done
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip(" "))
        return None


def _decode_event(event: str, data: str) -> str | dict[str, Any] | None:
    if event == "token":
        return str(json.loads(data)["text"])
    if event == "done":
        return dict(json.loads(data))
    if event == "error":
        raise RagkvHTTPError(200, json.loads(data).get("detail"))
    return None


class RagkvClient:
    """Sync and async calls to one ragkv service, each kind through one connection pool kept for the client's
    lifetime (an ``httpx.Client``; an ``httpx.AsyncClient`` made on the first async call, per event loop). A
    context manager, sync or async; thread-safe for sync calls."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 300.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        inner = transport or httpx.HTTPTransport()
        self._client = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s,
                                    transport=_ReportingTransport(inner, self.base_url))
        self._async: httpx.AsyncClient | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None

    def _async_client(self) -> httpx.AsyncClient:
        """The async pool of the running event loop (its connections belong to that loop: a client used from a
        new loop gets a new pool, and the old one is dropped with its loop)."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._async_loop is not loop:
            self._async = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout_s)
            self._async_loop = loop
        return self._async

    def close(self) -> None:
        self._client.close()

    async def aclose(self) -> None:
        """Close both pools (the async one from its own event loop)."""
        if self._async is not None and self._async_loop is asyncio.get_running_loop():
            await self._async.aclose()
        self._async = self._async_loop = None
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- JSON endpoints ---------------------------------------------------------------------------------------------
    def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        response = self._client.post(path, json=body)
        _raise_for(response)
        return response.json()

    async def _apost(self, path: str, body: Mapping[str, Any]) -> Any:
        response = await self._async_client().post(path, json=body)
        _raise_for(response)
        return response.json()

    def warm(self, texts: Sequence[str], shared: bool = False) -> dict[str, Any]:
        return self._post("/v1/warm", {"texts": list(texts), "shared": shared})

    async def awarm(self, texts: Sequence[str], shared: bool = False) -> dict[str, Any]:
        return await self._apost("/v1/warm", {"texts": list(texts), "shared": shared})

    def generate(self, query: str, documents: Sequence[str | Mapping[str, str]] = (), **options: Any
                 ) -> dict[str, Any]:
        """``options``: system, strategy, strategy_params, max_new_tokens, temperature, top_p, top_k, seed,
        stop, shared. Returns the service's JSON (answer, ttft_ms, timings_ms, documents, usage)."""
        return self._post("/v1/generate", {"query": query, "documents": list(documents), **_clean(options)})

    async def agenerate(self, query: str, documents: Sequence[str | Mapping[str, str]] = (), **options: Any
                        ) -> dict[str, Any]:
        return await self._apost("/v1/generate", {"query": query, "documents": list(documents), **_clean(options)})

    def stream(self, query: str, documents: Sequence[str | Mapping[str, str]] = (), **options: Any
               ) -> Iterator[str | dict[str, Any]]:
        """Text pieces as they are generated, then the final JSON summary (a dict)."""
        body = {"query": query, "documents": list(documents), **_clean(options), "stream": True}
        with self._client.stream("POST", "/v1/generate", json=body) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            parser = _EventParser()
            for line in response.iter_lines():
                event = parser.feed(line)
                item = _decode_event(*event) if event is not None else None
                if item is not None:
                    yield item

    async def astream(self, query: str, documents: Sequence[str | Mapping[str, str]] = (), **options: Any
                      ) -> AsyncIterator[str | dict[str, Any]]:
        body = {"query": query, "documents": list(documents), **_clean(options), "stream": True}
        async with self._async_client().stream("POST", "/v1/generate", json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for(response)
            parser = _EventParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                item = _decode_event(*event) if event is not None else None
                if item is not None:
                    yield item

    def lookup(self, keys: Sequence[str]) -> list[dict[str, Any]]:
        return list(self._post("/v1/chunks/lookup", {"keys": list(keys)})["results"])

    # -- chunk blobs --------------------------------------------------------------------------------------------
    def get_chunk(self, key: str) -> bytes | None:
        response = self._client.get(f"/v1/chunks/{key}")
        if response.status_code == 404:
            return None
        _raise_for(response)
        return response.content

    def put_chunk(self, key: str, blob: bytes, ttl_s: float | None = None) -> dict[str, Any]:
        params = {"ttl_s": ttl_s} if ttl_s is not None else None
        response = self._client.put(f"/v1/chunks/{key}", content=blob, params=params,
                                    headers={"Content-Type": "application/octet-stream"})
        _raise_for(response)
        return response.json()

    def delete_chunk(self, key: str) -> bool:
        response = self._client.delete(f"/v1/chunks/{key}")
        if response.status_code == 404:
            return False
        _raise_for(response)
        return True

    def stats(self) -> dict[str, Any]:
        response = self._client.get("/v1/stats")
        _raise_for(response)
        return response.json()

    def health(self) -> dict[str, Any]:
        response = self._client.get("/healthz")
        _raise_for(response)
        return response.json()


def _clean(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


__all__ = ["RagkvClient", "RagkvHTTPError", "ServiceUnreachable"]
