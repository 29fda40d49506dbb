"""Running the REST service: configuration, start-up (model, store, sample corpus), uvicorn, and a test server.

``ragkv serve`` calls ``serve(ServiceConfig(...))``: it opens the store, loads the model (SmolLM2-135M-Instruct
by default), warms the sample corpus (real-text facts for chat models, the synthetic task for the toy) (skipping what an earlier run stored), asks one sample question to pick
an example the model answers correctly, binds the socket, prints the URL and a ready-to-paste request, and
serves until interrupted. ``ServiceThread`` runs an app on a free loopback port in a background thread, for
tests and benchmarks.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from typing_extensions import Self

from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions
from ragkv.integrations.runtime import RagRuntime
from ragkv.integrations.service_http import ServiceLimits
from ragkv.integrations.sim_trace import TraceRecorder
from ragkv.integrations.tenants import OPEN_TENANT, TenantRegistry
from ragkv.kvstore import SHARED_NAMESPACE, ConfigError
from ragkv.middleware.abstract_selection import AbstractsConfig

log = logging.getLogger(__name__)


def _require_uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError("the ragkv service needs fastapi and uvicorn: pip install 'ragkv[service]'") from exc
    return uvicorn


@dataclass(frozen=True)
class ServiceConfig:
    store: str | None = None  # spec, config file, or None: $RAGKV_STORE / embedded host + disk
    model: str | None = None  # a local HF model directory; None: the bundled model
    dtype: str | None = None
    device: str | None = "auto"  # auto: the GPU when there is one, else the CPU
    near_duplicates: bool = False  # repair misses from stored near-duplicate chunks
    abstracts: bool = False  # store chunk abstracts and leave out the chunks far below the others
    abstract_threshold: float = AbstractsConfig.threshold
    role: str = "both"  # prefill | decode | both: /v1/prefill, /v1/decode, or every answer endpoint
    record_trace: str | None = None  # append every answered request to this trace file (ragkv simulate)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: str | None = None  # None: open access as tenant 'default' (loopback only)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    sample: bool = True  # warm the sample corpus at start-up
    allow_open_remote: bool = False  # listen beyond loopback without API keys
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, got {self.port}")
        if self.api_keys_file is None and not self.allow_open_remote and not _is_loopback(self.host):
            raise ConfigError(f"refusing to serve {self.host} without API keys: pass --api-keys FILE (or "
                              f"--allow-open-remote to serve everyone as one tenant)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SampleExample:
    question: str
    documents: tuple[str, ...]
    expected: str
    answered: str
    namespace: str
    max_new_tokens: int = 1

    @property
    def correct(self) -> bool:
        return self.expected.lower() in self.answered.lower()


def warm_sample(runtime: RagRuntime, namespace: str, probe: int = 8) -> tuple[dict[str, Any], SampleExample]:
    """Warm the sample corpus into ``namespace`` and pick an example the model answers correctly (the first
    of ``probe`` questions that it gets right with the default strategy; the first one otherwise)."""
    from ragkv.integrations.sample_corpus import load_facts_corpus, load_sample_corpus

    chat = runtime.engine.template.uses_chat_template
    corpus = load_facts_corpus() if chat else load_sample_corpus()
    max_new_tokens = 32 if chat else 1
    report = runtime.warm(corpus.documents(), namespace)
    chosen: SampleExample | None = None
    for q in corpus.questions[:probe]:
        answer = runtime.answer(AnswerRequest(
            query=q.question, documents=[Document(text=c) for c in q.chunks], namespace=namespace,
            readable_namespaces=frozenset({namespace}), generation=GenerationOptions(max_new_tokens=max_new_tokens)))
        example = SampleExample(q.question, q.chunks, q.answer, answer.text, namespace, max_new_tokens)
        if chosen is None or (example.correct and not chosen.correct):
            chosen = example
        if example.correct:
            break
    assert chosen is not None
    info = {"questions": len(corpus.questions), "chunks": len(report.keys), "computed": report.computed,
            "already_cached": report.already_cached, "namespace": namespace, "source": corpus.source,
            "example_correct": chosen.correct}
    return info, chosen


def example_request(url: str, example: SampleExample, auth: bool) -> str:
    """A ready-to-paste curl command for ``example``."""
    body: dict[str, Any] = {"query": example.question, "documents": list(example.documents), "strategy": "blend",
                            "max_new_tokens": example.max_new_tokens}
    if example.namespace == SHARED_NAMESPACE:
        body["shared"] = True
    parts = ["curl", "-s", f"{url}/v1/generate", "-H", "Content-Type: application/json"]
    command = " ".join(shlex.quote(p) for p in parts)
    if auth:
        command += ' -H "Authorization: Bearer $RAGKV_API_KEY"'
    return f"{command} -d {shlex.quote(json.dumps(body))}"


def build_state(config: ServiceConfig, runtime: RagRuntime | None = None, out: TextIO | None = None) -> Any:
    """Open (or take) the runtime, load the API keys and warm the sample corpus; returns a ``ServiceState``."""
    from ragkv.integrations.service_app import ServiceState

    registry = (TenantRegistry.from_file(config.api_keys_file) if config.api_keys_file
                else TenantRegistry.open_access())
    if runtime is None:
        runtime = RagRuntime.open(config.store, config.model, dtype=config.dtype, device=config.device,
                                  near_duplicates=config.near_duplicates,
                                  abstracts=AbstractsConfig(enabled=config.abstracts,
                                                            threshold=config.abstract_threshold),
                                  max_waiting=config.limits.max_waiting)
    recorder = TraceRecorder(config.record_trace) if config.record_trace else None
    state = ServiceState(runtime=runtime, registry=registry, limits=config.limits, role=config.role, recorder=recorder)
    if config.sample and config.role == "both":  # the sample's example request is a /v1/generate
        namespace = OPEN_TENANT if registry.open else SHARED_NAMESPACE
        start = time.perf_counter()
        try:
            info, example = warm_sample(runtime, namespace)
        except OSError as exc:  # an install without the sample corpus files: serve anyway, say why
            log.warning("the sample corpus could not be loaded (%s); serving without it", exc)
            return state
        state.sample = info
        state.sample_example = example
        if out is not None:
            print(f"sample corpus: {info['chunks']} chunks of {info['questions']} questions in namespace "
                  f"'{namespace}' ({info['computed']} computed, {info['already_cached']} already stored) in "
                  f"{time.perf_counter() - start:.1f} s", file=out)
    return state


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP,
    # and accepted connections inherit it; with proto 0 every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _uvicorn_config(app: Any, log_level: str) -> Any:
    uvicorn = _require_uvicorn()
    return uvicorn.Config(app, lifespan="off", log_level=log_level, access_log=log_level == "debug",
                          timeout_keep_alive=30, server_header=False)


def serve(config: ServiceConfig, out: TextIO = sys.stdout) -> int:
    """``ragkv serve``: start up, print the URL and an example request, serve until interrupted."""
    from ragkv.integrations.service_app import create_app

    uvicorn = _require_uvicorn()
    print("ragkv: loading the model and opening the store ...", file=out, flush=True)
    state = build_state(config, out=out)
    runtime = state.runtime
    sock = bind_socket(config.host, config.port)
    try:
        url = url_of(sock)
        example = state.sample_example
        if example is not None:
            state.example = example_request(url, example, auth=not state.registry.open)
        app = create_app(state)
        info = runtime.info
        print(f"model: {info.name} ({info.kind}): {info.label}", file=out)
        print(f"store: {runtime.store!r}", file=out)
        print(f"auth: {'API keys from ' + str(config.api_keys_file) if config.api_keys_file else 'open (one tenant)'}",
              file=out)
        print(f"\nragkv is serving on {url}  (status page {url}/ · API docs {url}/docs)", file=out)
        if state.example:
            print("\ntry it:\n  " + state.example, file=out)
            print(f"  expected answer: {example.expected}"
                  + ("" if example.correct else f"  (this model answered {example.answered!r}: {info.label})"),
                  file=out)
        out.flush()
        server = uvicorn.Server(_uvicorn_config(app, config.log_level))
        server.run(sockets=[sock])
    finally:
        sock.close()
        runtime.close()
        if state.recorder is not None:
            state.recorder.close()
    return 0


class ServiceThread:
    """Serve an app on a free loopback port in a background thread (tests, benchmarks, notebooks).

        with ServiceThread(create_app(state)) as server:
            httpx.get(server.url + "/healthz")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        uvicorn = _require_uvicorn()
        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(_uvicorn_config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="ragkv-service", daemon=True)

    def start(self, timeout_s: float = 30.0) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "SampleExample",
    "ServiceConfig",
    "ServiceThread",
    "bind_socket",
    "build_state",
    "example_request",
    "serve",
    "warm_sample",
]
