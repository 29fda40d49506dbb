"""The REST service: a FastAPI app over one ``RagRuntime`` (see ``ragkv.integrations.service`` to run it).

Routes: chunk blobs (PUT/GET/HEAD/DELETE ``/v1/chunks/{key}``, ``POST /v1/chunks/lookup``), ``POST /v1/warm``,
``POST /v1/generate`` (JSON or server-sent events), ``POST /v1/chat/completions`` (OpenAI-compatible, plus
``documents``), ``GET /v1/stats``, ``GET /healthz``, ``GET /metrics`` and the status page at ``/``.

Why handlers are thin: authentication, content types and body sizes are settled by ``GuardMiddleware``
before FastAPI runs; tenancy rules live in ``Tenant``; model work and its queue in ``RagRuntime``. Store
and model calls block, so they run in worker threads and the event loop keeps serving chunk traffic
while a generation runs.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
except ImportError as exc:  # pragma: no cover - part of every dev install
    raise ImportError("the ragkv service needs fastapi and uvicorn: pip install 'ragkv[service]'") from exc

from ragkv.integrations.answers import (
    Answer,
    AnswerRequest,
    Cancelled,
    Document,
    Forbidden,
    GenerationOptions,
    NotFound,
    Overloaded,
    QuotaExceeded,
)
from ragkv.integrations.metrics import Metrics
from ragkv.integrations.runtime import RagRuntime
from ragkv.integrations.service_chunks import add_chunk_routes
from ragkv.integrations.service_deps import TenantDep, check_text, error_responses, printable
from ragkv.integrations.service_http import GuardMiddleware, ServiceLimits, api_key_of, sse
from ragkv.integrations.service_models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    DecodeRequest,
    DocumentField,
    DocumentRef,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelList,
    PrefillRequest,
    PrefillResponse,
    WarmRequest,
    WarmResponse,
)
from ragkv.integrations.sim_trace import TraceRecorder
from ragkv.integrations.status_page import render_status_page
from ragkv.integrations.tenants import QuotaCheck, Tenant, TenantRegistry
from ragkv.kvstore import (
    ConfigError,
    CorruptEntry,
    ModelMismatch,
    RagKVError,
    TierUnavailable,
)
from ragkv.middleware.handoff import HandoffMissing
from ragkv.middleware.prompt_template import ChatTurn

log = logging.getLogger(__name__)

# the answer endpoints a server of each role leaves out: a prefill worker publishes, a decode worker resumes
ROLE_ROUTES = {"both": frozenset(),
               "prefill": frozenset({"/v1/decode", "/v1/generate", "/v1/chat/completions"}),
               "decode": frozenset({"/v1/prefill", "/v1/generate", "/v1/chat/completions", "/v1/warm"})}


@dataclass
class ServiceState:
    """Everything the app serves from. ``example`` is the ready-to-paste request shown on the status page."""

    runtime: RagRuntime
    registry: TenantRegistry
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    metrics: Metrics = field(default_factory=Metrics)
    sample: dict[str, Any] | None = None  # what was warmed at start-up (shown by /healthz)
    sample_example: Any = None  # ragkv.integrations.service.SampleExample
    example: str | None = None
    upload_slots: int = 4  # chunk uploads buffered at once; memory is bounded by this times max_chunk_bytes
    role: str = "both"  # prefill | decode | both: which answer endpoints this server offers (ROLE_ROUTES)
    recorder: TraceRecorder | None = None  # appends every answered request to a trace (ragkv simulate)


def create_app(state: ServiceState) -> FastAPI:
    """Build the app. The caller owns ``state.runtime`` (and closes it)."""
    runtime, limits, metrics = state.runtime, state.limits, state.metrics
    app = FastAPI(title="ragkv", version="0.1.0",
                  description="KV-cache store and RAG middleware: chunk KV blobs, warming, and generation that "
                              "reuses cached chunk KV (CacheBlend). Authenticate with 'Authorization: Bearer "
                              "<key>' or 'X-API-Key'.")
    upload_slots = asyncio.Semaphore(state.upload_slots)
    quotas = QuotaCheck(runtime.store)
    started = int(time.time())

    # -- errors -------------------------------------------------------------------------------------------------
    def handler(status: int, headers: dict[str, str] | None = None) -> Callable[..., Any]:
        async def handle(_request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": printable(str(exc))}, status_code=status, headers=headers)
        return handle

    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each problem by location and message, never echoing the input: an input holding NaN
        or a lone surrogate could not be rendered, and the handler itself must not fail."""
        errors = [{"loc": [str(part) for part in e.get("loc", ())], "msg": printable(str(e.get("msg", ""))),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid_request)
    async def overloaded(_request: Request, exc: Exception) -> JSONResponse:
        retry_after = max(1, round(getattr(exc, "retry_after_s", 1.0)))
        return JSONResponse({"detail": printable(str(exc))}, status_code=429, headers={"Retry-After": str(retry_after)})

    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(Forbidden, handler(403))
    app.add_exception_handler(PermissionError, handler(403))
    app.add_exception_handler(NotFound, handler(404))
    app.add_exception_handler(HandoffMissing, handler(404))
    app.add_exception_handler(QuotaExceeded, handler(413))
    app.add_exception_handler(ConfigError, handler(422))  # includes ContextTooLong and UnsupportedModel
    app.add_exception_handler(CorruptEntry, handler(422))
    app.add_exception_handler(ModelMismatch, handler(422))
    app.add_exception_handler(TierUnavailable, handler(503, {"Retry-After": "5"}))
    app.add_exception_handler(RagKVError, handler(422))

    add_chunk_routes(app, runtime, metrics, quotas, limits, upload_slots)

    # -- warm ---------------------------------------------------------------------------------------------------
    @app.post("/v1/warm", response_model=WarmResponse, tags=["rag"],
              summary="Compute and store the KV of chunk texts (already stored ones are skipped)",
              responses=error_responses(401, 403, 413, 415, 422, 429))
    async def warm(body: WarmRequest, tenant: TenantDep) -> WarmResponse:
        if len(body.texts) > limits.max_warm_texts:
            raise ConfigError(f"{len(body.texts)} texts; the limit is {limits.max_warm_texts}")
        texts = [check_text(t, f"text {i}", limits.max_text_chars) for i, t in enumerate(body.texts)]
        namespace = tenant.write_namespace(body.shared)
        if body.pin and not tenant.pin:
            raise Forbidden(f"tenant {tenant.name!r} may not pin chunks (the pin role)")

        def run() -> Any:
            tokens = sum(len(runtime.chunk_tokens(t)) for t in texts)
            quotas.check_write(tenant, namespace, runtime.chunk_bytes(tokens), pin=body.pin)
            return runtime.warm(texts, namespace, ttl_s=body.ttl_s, pin=body.pin)

        report = await anyio.to_thread.run_sync(run)
        metrics.observe_warm(report.computed, report.already_cached, tenant.name)
        return WarmResponse(keys=report.keys, namespace=namespace, computed=report.computed,
                            already_cached=report.already_cached, seconds=report.seconds)

    # -- generate -----------------------------------------------------------------------------------------------
    def documents(items: Sequence[DocumentField]) -> list[Document]:
        if len(items) > limits.max_documents:
            raise ConfigError(f"{len(items)} documents; the limit is {limits.max_documents}")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, DocumentRef):
                out.append(Document(key=item.key) if item.key is not None else
                           Document(text=check_text(str(item.text), f"document {i}", limits.max_text_chars)))
            else:
                out.append(Document(text=check_text(item, f"document {i}", limits.max_text_chars)))
        return out

    def options(body: Any, max_new_tokens: int, stop: Sequence[str]) -> GenerationOptions:
        if max_new_tokens > limits.max_new_tokens:
            raise ConfigError(f"max_new_tokens {max_new_tokens} exceeds the limit of {limits.max_new_tokens}")
        return GenerationOptions(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                                 top_k=body.top_k, seed=body.seed,
                                 stop=tuple(check_text(s, "a stop string", 256) for s in stop))

    def answer_request(tenant: Tenant, body: Any, query: str, system: str | None, docs: list[Document],
                       generation: GenerationOptions, history: tuple[ChatTurn, ...] = ()) -> AnswerRequest:
        for turn in history:
            check_text(turn.content, f"a {turn.role} message", limits.max_text_chars)
        namespace = tenant.write_namespace(body.shared)
        return AnswerRequest(query=check_text(query, "the query", limits.max_text_chars), history=history,
                             documents=docs, system=check_text(system, "the system text", limits.max_text_chars)
                             if system else None, namespace=namespace, readable_namespaces=tenant.readable(),
                             lookup_namespaces=tenant.lookup_order(), store_budget_bytes=quotas.room(tenant, namespace),
                             strategy=body.strategy, strategy_params=body.strategy_params, generation=generation)

    def record(answer: Answer, tenant: Tenant, endpoint: str) -> None:
        if state.recorder is not None:
            documents = [(d.key, d.tokens) for d in answer.documents if d.key]
            state.recorder.record(tenant.namespace, documents,
                                  max(0, answer.prompt_tokens - sum(n for _, n in documents)))
        decode_s = answer.total_s - answer.ttft_s
        rate = (answer.completion_tokens - 1) / decode_s if answer.completion_tokens > 1 and decode_s > 0 else None
        metrics.observe_answer(answer.ttft_s, answer.strategy, [d.hit for d in answer.documents],
                               [d.tier for d in answer.documents], tenant.name, endpoint=endpoint,
                               queue_s=answer.timings_ms.get("queue", 0.0) / 1e3, tokens_per_s=rate)

    def outcome(answer: Answer) -> dict[str, Any]:
        d = answer.to_dict()
        d["model"] = runtime.info.name
        d["usage"]["total_tokens"] = answer.prompt_tokens + answer.completion_tokens
        return d

    async def checked(request: AnswerRequest) -> Any:
        if runtime.waiting >= runtime.max_waiting:
            raise Overloaded(f"{runtime.waiting} model requests are already waiting; retry later")
        return await anyio.to_thread.run_sync(runtime.check, request)

    async def stream_answer(check: Any, tenant: Tenant, endpoint: str, on_done: Callable[[Answer], list[bytes]],
                            on_piece: Callable[[str], bytes], on_error: Callable[[str], list[bytes]]
                            ) -> AsyncIterator[bytes]:
        """Run the answer in a worker thread and relay its text pieces; stop it if the client goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def on_token(text: str) -> None:
            if stop.is_set():
                raise Cancelled
            loop.call_soon_threadsafe(queue.put_nowait, ("piece", text))

        def work() -> None:
            try:
                result: tuple[str, Any] = ("done", runtime.run(check, on_token))
            except Cancelled:
                return
            except (RagKVError, PermissionError) as exc:
                result = ("error", str(exc))
            except Exception as exc:  # the stream has started: report it in-band (and log it) instead of hanging
                log.exception("streamed generation failed")
                result = ("error", f"internal error: {type(exc).__name__}")
            loop.call_soon_threadsafe(queue.put_nowait, result)

        # a thread of its own: the loop's default executor has min(32, cores + 4) threads, which would cap how
        # many streams the scheduler can batch (each waits on its tokens, not on a core)
        worker = loop.create_future()

        def thread_main() -> None:
            try:
                work()
            finally:
                loop.call_soon_threadsafe(lambda: worker.done() or worker.set_result(None))

        threading.Thread(target=thread_main, name="ragkv-stream", daemon=True).start()
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "piece":
                    yield on_piece(payload)
                elif kind == "done":
                    record(payload, tenant, endpoint)
                    for event in on_done(payload):
                        yield event
                    break
                else:
                    for event in on_error(payload):
                        yield event
                    break
        finally:
            stop.set()
            await asyncio.shield(worker)

    @app.post("/v1/generate", response_model=GenerateResponse, tags=["rag"],
              summary="Answer a query over documents (texts or chunk keys) with a cache strategy",
              responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                               "description": "JSON, or server-sent events (token, done) when stream is true"},
                         **error_responses(401, 403, 404, 413, 415, 422, 429)})
    async def generate(body: GenerateRequest, tenant: TenantDep) -> Any:
        max_new = body.max_new_tokens or min(64, limits.max_new_tokens)
        history = tuple(ChatTurn(t.role, t.content) for t in body.history)
        request = answer_request(tenant, body, body.query, body.system, documents(body.documents),
                                 options(body, max_new, body.stop), history)
        check = await checked(request)
        if body.stream:
            return StreamingResponse(stream_answer(
                check, tenant, "generate", on_done=lambda a: [sse(outcome(a), "done")], on_piece=lambda t: sse({"text": t}, "token"),
                on_error=lambda m: [sse({"detail": m}, "error")]), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"})
        answer = await anyio.to_thread.run_sync(runtime.run, check)
        record(answer, tenant, "generate")
        return outcome(answer)

    # -- prefill → decode hand-off (ragkv.middleware.handoff) ---------------------------------------------------
    @app.post("/v1/prefill", response_model=PrefillResponse, tags=["handoff"],
              summary="Prepare a prompt and publish its KV for a decode worker (no token decoded)",
              responses=error_responses(401, 403, 404, 413, 415, 422, 429))
    async def prefill(body: PrefillRequest, tenant: TenantDep) -> dict[str, Any]:
        history = tuple(ChatTurn(t.role, t.content) for t in body.history)
        request = answer_request(tenant, body, body.query, body.system, documents(body.documents),
                                 GenerationOptions(max_new_tokens=1), history)
        check = await checked(request)
        prompt = check.prepare
        tokens = len(prompt.system or ()) + sum(len(c) for c in prompt.chunks) + len(prompt.query)
        # the hand-off is written to the tenant's namespace: it must fit the quota, like any write
        await anyio.to_thread.run_sync(quotas.check_write, tenant, tenant.namespace, runtime.chunk_bytes(tokens))
        handoff, report = await anyio.to_thread.run_sync(runtime.prefill, check, tenant.namespace, body.ttl_s)
        return {**handoff.to_dict(), "ttl_s": body.ttl_s, "timings_ms": report.timings_ms,
                "documents": [d.to_dict() for d in report.documents]}

    @app.post("/v1/decode", response_model=GenerateResponse, tags=["handoff"],
              summary="Decode from a hand-off published by /v1/prefill (the same tenant's; used once)",
              responses=error_responses(401, 403, 404, 422, 429))
    async def decode(body: DecodeRequest, tenant: TenantDep) -> dict[str, Any]:
        if runtime.waiting >= runtime.max_waiting:
            raise Overloaded(f"{runtime.waiting} model requests are already waiting; retry later")
        generation = options(body, body.max_new_tokens or min(64, limits.max_new_tokens), body.stop)
        answer = await anyio.to_thread.run_sync(runtime.decode, body.handle, tenant.namespace, generation)
        record(answer, tenant, "decode")
        return outcome(answer)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["rag"],
              summary="OpenAI-compatible chat completions, answered from cached document KV",
              responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                               "description": "chat.completion, or chat.completion.chunk events when streaming"},
                         **error_responses(401, 403, 404, 413, 415, 422, 429)})
    async def chat_completions(body: ChatCompletionRequest, tenant: TenantDep) -> Any:
        system, history, query = body.turns()
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_new = body.max_completion_tokens or body.max_tokens or min(128, limits.max_new_tokens)
        request = answer_request(tenant, body, query, system, documents(body.documents), options(body, max_new, stop),
                                 history)
        check = await checked(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = runtime.info.name  # the model that answers, whatever name the client sent
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def usage(a: Answer) -> dict[str, int]:
            return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
                    "total_tokens": a.prompt_tokens + a.completion_tokens}

        def extras(a: Answer) -> dict[str, Any]:
            return {"ttft_ms": a.ttft_s * 1e3, "timings_ms": a.timings_ms, "strategy": a.strategy,
                    "documents": [d.to_dict() for d in a.documents]}

        def finish(a: Answer) -> str:
            return "length" if a.finish_reason in ("length", "context_limit") else "stop"

        if body.stream:
            def chunk(delta: dict[str, Any], reason: str | None = None, **more: Any) -> dict[str, Any]:
                return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **more}

            async def events() -> AsyncIterator[bytes]:
                yield sse(chunk({"role": "assistant", "content": ""}))
                async for event in stream_answer(
                        check, tenant, "chat", on_piece=lambda t: sse(chunk({"content": t})),
                        on_done=lambda a: [sse(chunk({}, finish(a), ragkv=extras(a))),
                                           *([sse({**chunk({}), "choices": [], "usage": usage(a)})]
                                             if include_usage else []), sse("[DONE]")],
                        on_error=lambda m: [sse({"error": {"message": m, "type": "invalid_request_error"}}),
                                            sse("[DONE]")]):
                    yield event

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        a = await anyio.to_thread.run_sync(runtime.run, check)
        record(a, tenant, "chat")
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text},
                             "finish_reason": finish(a)}],
                "usage": usage(a), "ragkv": extras(a)}

    @app.get("/v1/models", response_model=ModelList, tags=["rag"], summary="The model this server answers with",
             responses=error_responses(401))
    async def list_models(tenant: TenantDep) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": runtime.info.name, "object": "model", "created": started,
                                            "owned_by": "ragkv"}]}

    # -- observability ------------------------------------------------------------------------------------------
    @app.get("/v1/stats", tags=["observability"], summary="Store, cache and service statistics (JSON)",
             responses=error_responses(401))
    async def stats(tenant: TenantDep) -> dict[str, Any]:
        store_stats = await anyio.to_thread.run_sync(runtime.store.stats)
        usage = await anyio.to_thread.run_sync(runtime.store.usage, tenant.namespace)
        return {"tenant": tenant.name, "namespace": tenant.namespace, "store": store_stats,
                "service": metrics.snapshot(), "model": runtime.info.to_dict(), "waiting": runtime.waiting,
                "calibration": runtime.calibration_summary(),
                "codec_calibration": runtime.codec_calibration_summary(),
                "near_duplicates": runtime.near_duplicate_summary(),
                "abstracts": runtime.abstracts_summary(),
                "usage": {**usage, "quota_bytes": tenant.quota_bytes, "pinned_quota_bytes": tenant.pinned_quota_bytes},
                "tenant_metrics": metrics.tenant_snapshot(None if tenant.admin else tenant.name)}

    @app.get("/healthz", response_model=HealthResponse, tags=["observability"], summary="Liveness and what is served")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": {**runtime.info.to_dict(), "fingerprint": str(runtime.adapter.fingerprint)},
                "store": repr(runtime.store), "auth": not state.registry.open, "sample_corpus": state.sample}

    @app.get("/metrics", response_class=PlainTextResponse, tags=["observability"],
             summary="Prometheus metrics (text exposition format)")
    async def prometheus(request: Request) -> PlainTextResponse:
        store_stats = await anyio.to_thread.run_sync(runtime.store.stats)
        # anyone may scrape aggregates; series by tenant need an admin's key (or an open, single-tenant service)
        caller = state.registry.authenticate(api_key_of({k.lower(): v for k, v in request.scope["headers"]}))
        per_tenant = state.registry.open or (caller is not None and caller.admin)
        text = metrics.render_prometheus(store_stats, {"ragkv_model_requests_waiting": runtime.waiting},
                                         scheduler=runtime.scheduler, per_tenant=per_tenant)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, tags=["observability"], summary="Status page (HTML)")
    async def status_page() -> HTMLResponse:
        store_stats = await anyio.to_thread.run_sync(runtime.store.stats)
        page = render_status_page(model=runtime.info.to_dict(), store_repr=repr(runtime.store),
                                  store_stats=store_stats, service=metrics.snapshot(),
                                  samples=metrics.recent_ttfts(), auth=not state.registry.open, example=state.example)
        return HTMLResponse(page)

    if state.role not in ROLE_ROUTES:
        raise ConfigError(f"role must be one of {sorted(ROLE_ROUTES)}, got {state.role!r}")
    left_out = ROLE_ROUTES[state.role]
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in left_out]
    app.add_middleware(GuardMiddleware, registry=state.registry, limits=limits, metrics=metrics)
    return app


__all__ = ["ServiceState", "create_app"]
