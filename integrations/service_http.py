"""The service's outermost ASGI layer: authentication, content types, body-size limits, and request metrics.

Why one plain ASGI middleware in front of FastAPI rather than per-route dependencies: the order of refusals
must not depend on FastAPI internals (which parse a JSON body before running dependencies, so a bad body
would answer 422 before a missing key answered 401), and an oversized body must be refused from its
``Content-Length`` before a byte of it is read. Order: 401 (API key) -> 415 (content type) -> 413 (size) ->
408 (a body that stalls for ``body_timeout_s``) -> 422 for JSON bodies that are not UTF-8 or not standard
JSON (``NaN``, ``Infinity``, nesting deeper than ``MAX_JSON_DEPTH``); everything after that is FastAPI's (422
for malformed keys and bodies). An exception escaping a route is answered here as a plain 500, so the
keep-alive connection survives it (Starlette's outermost handler would re-raise and close it).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException

from ragkv.integrations.metrics import Metrics
from ragkv.integrations.tenants import TenantRegistry

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)
TENANT_SCOPE_KEY = "ragkv.tenant"
MAX_JSON_DEPTH = 32
CHUNKS_PREFIX = "/v1/chunks/"
OCTET_STREAM = "application/octet-stream"
JSON = "application/json"


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for. Bodies over the size limits get 413, the rest 422."""

    max_chunk_bytes: int = 256 << 20  # a PUT chunk body (container blob)
    max_json_bytes: int = 4 << 20  # any JSON body
    max_documents: int = 64
    max_text_chars: int = 200_000  # per document, query or system text
    max_warm_texts: int = 1024
    max_lookup_keys: int = 1024
    max_new_tokens: int = 512
    max_waiting: int = 16  # model requests queued behind the one running; more get 429
    body_timeout_s: int = 30  # a request body that sends nothing for this long gets 408

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")


def expected_content_type(method: str, path: str) -> str | None:
    """The media type a route's body must have, or None for routes without a body."""
    if method == "PUT" and path.startswith(CHUNKS_PREFIX):
        return OCTET_STREAM
    if method == "POST" and path.startswith("/v1/"):
        return JSON
    return None


def _media_type(headers: dict[bytes, bytes]) -> str:
    raw = headers.get(b"content-type", b"").decode("latin-1")
    return raw.split(";", 1)[0].strip().lower()


def api_key_of(headers: dict[bytes, bytes]) -> str | None:
    """The API key a request sent (``Authorization: Bearer`` or ``X-API-Key``), or None."""
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, token = auth.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1").strip() if key else None


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class _TooLarge(HTTPException):
    """Raised from ``receive`` when a body without Content-Length outgrows the limit. An HTTPException, so
    FastAPI's body reader passes it on (as 413) instead of calling it a parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds the limit of {limit} bytes")


class _SlowBody(HTTPException):
    """Raised from ``receive`` when the client stops sending the body it promised."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(status_code=408, detail=f"the request body stalled for {timeout_s:g} s")


def json_problem(body: bytes) -> str | None:
    """Why ``body`` is not strict JSON (not UTF-8, NaN/Infinity, nested too deep), or None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not UTF-8 JSON: {exc.reason} at byte {exc.start}"
    depth = 0
    for ch in text:  # brackets inside strings count too: conservative, and bounded before the parser recurses
        if ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return f"the request body nests deeper than {MAX_JSON_DEPTH} levels"
        elif ch in "]}":
            depth -= 1

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not standard JSON")

    try:
        json.loads(text, parse_constant=refuse)
    except ValueError as exc:
        return f"the request body is not standard JSON: {exc}"
    return None


class GuardMiddleware:
    """Authenticates ``/v1/*`` requests, enforces content types and body limits, and records metrics."""

    def __init__(self, app: ASGIApp, registry: TenantRegistry, limits: ServiceLimits, metrics: Metrics) -> None:
        self.app = app
        self.registry = registry
        self.limits = limits
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        started = {"response": False}

        async def send_tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["response"] = True
            await send_recording(message)

        try:
            await self._guarded(scope, receive, send_tracking)
        except Exception:  # answered as a 500 here, so the keep-alive connection survives
            log.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            if started["response"]:
                raise  # a streamed body already started: nothing but closing the connection can end it
            await send_json(send_recording, 500, {"detail": "internal error"})
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("unmatched" if status["code"] == 404 else "refused")
            self.metrics.observe_request(scope.get("method", "GET"), template, status["code"],
                                         time.perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope.get("method", "GET")
        path: str = scope.get("path", "/")
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if path.startswith("/v1/"):
            tenant = self.registry.authenticate(api_key_of(headers))
            if tenant is None:
                await send_json(send, 401, {"detail": "missing or invalid API key (send 'Authorization: Bearer "
                                                      "<key>' or 'X-API-Key: <key>')"},
                                [(b"www-authenticate", b"Bearer")])
                return
            scope[TENANT_SCOPE_KEY] = tenant
        wanted = expected_content_type(method, path)
        if wanted is not None:
            media = _media_type(headers)
            if media != wanted and not (wanted == JSON and media.startswith("application/") and media.endswith("+json")):
                await send_json(send, 415, {"detail": f"this endpoint takes {wanted}, got {media or 'no content type'}"})
                return
        limit = self.limits.max_chunk_bytes if wanted == OCTET_STREAM else self.limits.max_json_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_json(send, 400, {"detail": "invalid Content-Length"})
                return
            if length > limit:
                await send_json(send, 413, {"detail": f"request body of {length} bytes exceeds the limit of {limit}"})
                return
        timeout_s = self.limits.body_timeout_s
        body_done = {"yes": False}

        async def receive_timed() -> Message:
            """Each piece of the body must come within ``timeout_s``; after the body, no deadline (a
            streaming response listens here for the client going away)."""
            if body_done["yes"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout_s)
            except asyncio.TimeoutError:
                raise _SlowBody(timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done["yes"] = True
            return message

        if wanted == JSON:
            # JSON bodies are small (bounded by the limit): read them here, so a body that is not strict JSON
            # is a 422 like any other malformed body (never FastAPI's 400 or a 500 rendering NaN).
            body = bytearray()
            more = True
            while more:
                try:
                    message = await receive_timed()
                except _SlowBody as exc:
                    await send_json(send, 408, {"detail": exc.detail}, [(b"connection", b"close")])
                    return
                if message["type"] != "http.request":
                    return  # the client went away
                body += message.get("body", b"")
                more = bool(message.get("more_body", False))
                if len(body) > limit:
                    await send_json(send, 413, {"detail": f"request body exceeds the limit of {limit} bytes"})
                    return
            problem = json_problem(bytes(body))
            if problem is not None:
                await send_json(send, 422, {"detail": problem})
                return
            receive_timed = _replay(bytes(body), receive)
        received = {"n": 0}
        started = {"response": False}

        async def receive_limited() -> Message:
            message = await receive_timed()
            if message["type"] == "http.request":
                received["n"] += len(message.get("body", b""))
                if received["n"] > limit:
                    raise _TooLarge(limit)
            return message

        async def send_tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["response"] = True
            await send(message)

        try:
            await self.app(scope, receive_limited, send_tracking)
        except (_TooLarge, _SlowBody) as exc:
            if started["response"]:
                raise
            close = [(b"connection", b"close")] if isinstance(exc, _SlowBody) else []
            await send_json(send, exc.status_code, {"detail": exc.detail}, close)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields an already read body once, then defers to the real one (disconnects)."""
    sent = {"body": False}

    async def replayed() -> Message:
        if not sent["body"]:
            sent["body"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event; ``data`` is JSON-encoded unless it is already a string."""
    text = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return (head + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


__all__ = ["TENANT_SCOPE_KEY", "GuardMiddleware", "ServiceLimits", "api_key_of", "expected_content_type", "send_json", "sse"]
