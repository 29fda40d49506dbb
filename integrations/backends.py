"""What the framework adapters (LangChain, LlamaIndex) talk to: an in-process runtime or a ragkv service.

A backend warms chunk texts and answers a prompt that contains documents. The adapters must be drop-in: a
standard RAG chain formats the retrieved documents into the prompt text itself, so the chat model (or LLM)
only sees one string. The retriever therefore records the texts it returned in the backend's
``DocumentRegistry``, and the model finds them again inside its prompt with ``split_prompt``: text before
the first document becomes the system prefix, each document a cached chunk, non-blank text between
documents (labels such as "Document 2:") a small chunk of its own, and the text after the last document
the query. Whitespace between documents is dropped: chunk KV is independent of separators by design. Chat
models hand over their messages (``split_chat``): roles and order are kept, the chat template renders them.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragkv.integrations.answers import (
    Answer,
    AnswerRequest,
    Cancelled,
    Document,
    DocumentReport,
    GenerationOptions,
    readable_namespaces,
)
from ragkv.integrations.runtime import RagRuntime
from ragkv.kvstore import RagKVError
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.prompt_template import ChatTurn

log = logging.getLogger(__name__)


class DocumentRegistry:
    """The most recently retrieved document texts (bounded LRU), shared by a retriever and a model."""

    def __init__(self, max_texts: int = 4096) -> None:
        self.max_texts = max_texts
        self._texts: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, texts: Sequence[str]) -> None:
        with self._lock:
            for t in texts:
                if t.strip():
                    self._texts[t] = None
                    self._texts.move_to_end(t)
            while len(self._texts) > self.max_texts:
                self._texts.popitem(last=False)

    def texts(self) -> list[str]:
        with self._lock:
            return list(reversed(self._texts))

    def __len__(self) -> int:
        return len(self._texts)


@dataclass(frozen=True)
class SplitPrompt:
    system: str | None
    chunks: list[str]
    query: str
    history: tuple[ChatTurn, ...] = ()  # earlier chat turns, in order


def split_prompt(text: str, documents: Sequence[str], ends_with_query: bool = True) -> SplitPrompt:
    """Cut ``text`` around every occurrence of the known ``documents`` (longest first, no overlaps). With
    ``ends_with_query``, a text that ends with a document gives that document as the query (it is what the
    model continues)."""
    spans: list[tuple[int, int, str]] = []
    taken: list[tuple[int, int]] = []
    for doc in sorted({d for d in documents if d.strip()}, key=len, reverse=True):
        start = text.find(doc)
        while start >= 0:
            end = start + len(doc)
            if all(end <= a or start >= b for a, b in taken):
                spans.append((start, end, doc))
                taken.append((start, end))
            start = text.find(doc, end)
    if not spans:
        return SplitPrompt(None, [], text.strip())
    spans.sort()
    chunks: list[str] = []
    for i, (start, end, doc) in enumerate(spans):
        if i > 0:
            gap = text[spans[i - 1][1]:start].strip()
            if gap:
                chunks.append(gap)
        chunks.append(doc)
    system = text[:spans[0][0]].strip() or None
    query = text[spans[-1][1]:].strip()
    if not query and ends_with_query:
        query = chunks.pop()
    return SplitPrompt(system, chunks, query)


def _joined(*texts: str | None) -> str | None:
    return "\n\n".join(t for t in texts if t) or None


def split_chat(messages: Sequence[tuple[str, str]], documents: Sequence[str]) -> SplitPrompt:
    """Chat messages ``(role, text)`` (role system, user or assistant) -> a prompt for the chat template.

    System messages make the system text, the last user message the question, the messages between them the
    history (roles and order kept). Known documents are cut out of the system text and the question, where
    prompt templates put retrieved context; the text around them stays where it was written. Messages that do
    not end with a user message are read as one question (their texts joined in order).
    """
    system_text = _joined(*(t for r, t in messages if r == "system"))
    dialogue = [(r, t) for r, t in messages if r != "system" and t]
    if not dialogue:
        raise ConfigError("the messages hold no question")
    if dialogue[-1][0] != "user":
        dialogue = [("user", "\n\n".join(t for _, t in dialogue))]
    in_system = split_prompt(system_text or "", documents, ends_with_query=False)
    in_question = split_prompt(dialogue[-1][1], documents)
    history = tuple(ChatTurn(role, text) for role, text in dialogue[:-1])
    query = _joined(in_question.system, in_question.query) if in_question.chunks else in_question.query
    if not query:
        raise ConfigError("the user's question holds no text besides the documents")
    return SplitPrompt(_joined(in_system.system, in_system.query), in_system.chunks + in_question.chunks, query,
                       history)


@dataclass
class AnswerSettings:
    """Per-call settings of a model adapter."""

    generation: GenerationOptions = field(default_factory=GenerationOptions)
    strategy: str | None = None
    strategy_params: Mapping[str, Any] = field(default_factory=dict)


class LocalBackend:
    """An in-process ``RagRuntime``, one namespace."""

    def __init__(self, runtime: RagRuntime, namespace: str = "default", registry: DocumentRegistry | None = None
                 ) -> None:
        self.runtime = runtime
        self.namespace = namespace
        self.registry = registry or DocumentRegistry()
        self.model_name = runtime.info.name

    def warm(self, texts: Sequence[str]) -> list[str]:
        self.registry.add(texts)
        return list(self.runtime.warm(list(texts), self.namespace).keys) if texts else []

    async def awarm(self, texts: Sequence[str]) -> list[str]:
        return await asyncio.to_thread(self.warm, texts)

    def _request(self, prompt: SplitPrompt, settings: AnswerSettings) -> AnswerRequest:
        return AnswerRequest(query=prompt.query, documents=[Document(text=c) for c in prompt.chunks],
                             system=prompt.system, history=prompt.history, namespace=self.namespace,
                             readable_namespaces=readable_namespaces(self.namespace), strategy=settings.strategy,
                             strategy_params=dict(settings.strategy_params), generation=settings.generation)

    def answer(self, prompt: SplitPrompt, settings: AnswerSettings) -> Answer:
        return self.runtime.answer(self._request(prompt, settings))

    async def aanswer(self, prompt: SplitPrompt, settings: AnswerSettings) -> Answer:
        return await asyncio.to_thread(self.answer, prompt, settings)

    def stream(self, prompt: SplitPrompt, settings: AnswerSettings) -> Iterator[str | Answer]:
        """Text pieces as they come, then the ``Answer``. Closing the iterator early stops generation."""
        checked = self.runtime.check(self._request(prompt, settings))
        pieces: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = threading.Event()

        def on_token(text: str) -> None:
            if stop.is_set():
                raise Cancelled
            pieces.put(("piece", text))

        def work() -> None:
            try:
                pieces.put(("done", self.runtime.run(checked, on_token)))
            except Cancelled:
                pieces.put(("cancelled", None))
            except Exception as exc:  # handed to the consumer, who re-raises it
                pieces.put(("error", exc))

        thread = threading.Thread(target=work, name="ragkv-stream", daemon=True)
        thread.start()
        try:
            while True:
                kind, payload = pieces.get()
                if kind == "piece":
                    yield payload
                elif kind == "done":
                    yield payload
                    return
                elif kind == "error":
                    raise payload
                else:
                    return
        finally:
            stop.set()

    async def astream(self, prompt: SplitPrompt, settings: AnswerSettings) -> AsyncIterator[str | Answer]:
        """``stream`` for asyncio: the answer runs on a thread of its own (it waits on the scheduler), pieces
        arrive on this loop as they come; closing the generator early stops generation."""
        checked = await asyncio.to_thread(self.runtime.check, self._request(prompt, settings))
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def on_token(text: str) -> None:
            if stop.is_set():
                raise Cancelled
            loop.call_soon_threadsafe(pieces.put_nowait, ("piece", text))

        def work() -> None:
            try:
                item: tuple[str, Any] = ("done", self.runtime.run(checked, on_token))
            except Cancelled:
                item = ("cancelled", None)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
                item = ("error", exc)
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening
                pass

        threading.Thread(target=work, name="ragkv-astream", daemon=True).start()
        try:
            while True:
                kind, payload = await pieces.get()
                if kind == "error":
                    raise payload
                if kind == "cancelled":
                    return
                yield payload
                if kind == "done":
                    return
        finally:
            stop.set()


def _answer_from_json(data: Mapping[str, Any]) -> Answer:
    documents = [DocumentReport(**{k: d[k] for k in DocumentReport.__dataclass_fields__ if k in d})
                 for d in data["documents"]]
    usage = data.get("usage", {})
    return Answer(text=data["answer"], finish_reason=data["finish_reason"], strategy=data["strategy"],
                  ttft_s=data["ttft_ms"] / 1e3, total_s=data["total_ms"] / 1e3, timings_ms=dict(data["timings_ms"]),
                  documents=documents, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                  completion_tokens=int(usage.get("completion_tokens", 0)))


class HttpBackend:
    """A ragkv service, through ``RagkvClient`` (``shared``: use the shared namespace)."""

    def __init__(self, client: Any, shared: bool = False, registry: DocumentRegistry | None = None) -> None:
        self.client = client
        self.shared = shared
        self.registry = registry or DocumentRegistry()
        self.model_name = "ragkv"

    @classmethod
    def connect(cls, base_url: str, api_key: str | None = None, **kwargs: Any) -> HttpBackend:
        from ragkv.integrations.client import RagkvClient

        return cls(RagkvClient(base_url, api_key), **kwargs)

    def warm(self, texts: Sequence[str]) -> list[str]:
        self.registry.add(texts)
        return list(self.client.warm(list(texts), shared=self.shared)["keys"]) if texts else []

    async def awarm(self, texts: Sequence[str]) -> list[str]:
        self.registry.add(texts)
        return list((await self.client.awarm(list(texts), shared=self.shared))["keys"]) if texts else []

    def _options(self, prompt: SplitPrompt, settings: AnswerSettings) -> dict[str, Any]:
        g = settings.generation
        return {"system": prompt.system, "history": [{"role": t.role, "content": t.content} for t in prompt.history]
                or None, "strategy": settings.strategy,
                "strategy_params": dict(settings.strategy_params) or None, "max_new_tokens": g.max_new_tokens,
                "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k, "seed": g.seed,
                "stop": list(g.stop) or None, "shared": self.shared or None}

    def answer(self, prompt: SplitPrompt, settings: AnswerSettings) -> Answer:
        return _answer_from_json(self.client.generate(prompt.query, prompt.chunks, **self._options(prompt, settings)))

    async def aanswer(self, prompt: SplitPrompt, settings: AnswerSettings) -> Answer:
        data = await self.client.agenerate(prompt.query, prompt.chunks, **self._options(prompt, settings))
        return _answer_from_json(data)

    def stream(self, prompt: SplitPrompt, settings: AnswerSettings) -> Iterator[str | Answer]:
        for item in self.client.stream(prompt.query, prompt.chunks, **self._options(prompt, settings)):
            yield _answer_from_json(item) if isinstance(item, dict) else item

    async def astream(self, prompt: SplitPrompt, settings: AnswerSettings) -> AsyncIterator[str | Answer]:
        async for item in self.client.astream(prompt.query, prompt.chunks, **self._options(prompt, settings)):
            yield _answer_from_json(item) if isinstance(item, dict) else item


def _warm_errors() -> tuple[type[BaseException], ...]:
    try:
        import httpx
    except ImportError:
        return (RagKVError, OSError)
    return (RagKVError, OSError, httpx.HTTPError)


def warm_quietly(backend: Any, texts: Sequence[str]) -> None:
    """Warm for a retriever: a failure to warm must never fail the retrieval it rides on (drop-in)."""
    try:
        backend.warm(texts)
    except _warm_errors() as exc:
        backend.registry.add(texts)
        log.warning("ragkv could not warm %d retrieved documents: %s", len(texts), exc)


async def awarm_quietly(backend: Any, texts: Sequence[str]) -> None:
    try:
        await backend.awarm(texts)
    except _warm_errors() as exc:
        backend.registry.add(texts)
        log.warning("ragkv could not warm %d retrieved documents: %s", len(texts), exc)


__all__ = [
    "AnswerSettings",
    "DocumentRegistry",
    "HttpBackend",
    "LocalBackend",
    "SplitPrompt",
    "awarm_quietly",
    "split_prompt",
    "warm_quietly",
]
