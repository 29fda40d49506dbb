"""LangChain integration: a drop-in retriever that warms chunk KV, and a chat model that answers from it.

    backend = LocalBackend(RagRuntime.open())          # or HttpBackend.connect("http://127.0.0.1:8000", key)
    retriever = RagkvRetriever(backend=backend, base_retriever=my_retriever)   # or index=FaissIndex.open(dir)
    llm = ChatRagkv(backend=backend)
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm

``RagkvRetriever`` returns the wrapped retriever's documents unchanged (at most ``k`` when ``k`` is set,
in the constructor or per call) and warms their KV in the store. ``ChatRagkv`` finds those documents
inside its prompt (see ``ragkv.integrations.backends``) and answers with the middleware, so each document
is loaded from the cache instead of prefilled: the chain gets the TTFT gain without other changes.
Documents can also be passed explicitly: ``llm.invoke(messages, documents=[...])``.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.callbacks.manager import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.documents import Document
    from langchain_core.language_models.base import LangSmithParams
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.utils import from_env, secret_from_env
    from pydantic import ConfigDict, Field, SecretStr
except ImportError as exc:
    raise ImportError("the LangChain integration needs langchain-core: pip install 'ragkv[langchain]'") from exc

from ragkv.integrations.answers import Answer, GenerationOptions
from ragkv.integrations.backends import AnswerSettings, HttpBackend, awarm_quietly, split_chat, warm_quietly
from ragkv.kvstore.errors import ConfigError

DEFAULT_INDEX_K = 4


class RagkvRetriever(BaseRetriever):
    """Wraps any retriever (``base_retriever``) or the built-in FAISS ``index``; warms what it returns."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backend: Any = Field(description="LocalBackend or HttpBackend that stores the documents' KV")
    base_retriever: BaseRetriever | None = Field(default=None, description="The retriever to wrap")
    index: Any = Field(default=None, description="A ragkv FaissIndex, used when no base_retriever is given")
    k: int | None = Field(default=None, ge=1, description="At most this many documents (None: as the base gives, "
                                                          f"{DEFAULT_INDEX_K} from the index)")
    warm: bool = Field(default=True, description="Compute and store the KV of returned documents")

    def model_post_init(self, context: Any) -> None:
        if (self.base_retriever is None) == (self.index is None):
            raise ConfigError("give RagkvRetriever exactly one of base_retriever= or index=")

    def _limit(self, kwargs: dict[str, Any]) -> int | None:
        k = kwargs.get("k", self.k)
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        return k

    def _from_index(self, query: str, k: int | None) -> list[Document]:
        hits = self.index.search(query, k or DEFAULT_INDEX_K)
        return [Document(page_content=h.text, metadata={**h.metadata, "score": h.score}) for h in hits]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
                                ) -> list[Document]:
        k = self._limit(kwargs)
        if self.base_retriever is not None:
            docs = self.base_retriever.invoke(query, config={"callbacks": run_manager.get_child()})
        else:
            docs = self._from_index(query, k)
        docs = docs[:k] if k is not None else docs
        if self.warm:
            warm_quietly(self.backend, [d.page_content for d in docs])
        return docs

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       **kwargs: Any) -> list[Document]:
        k = self._limit(kwargs)
        if self.base_retriever is not None:
            docs = await self.base_retriever.ainvoke(query, config={"callbacks": run_manager.get_child()})
        else:
            import asyncio

            docs = await asyncio.to_thread(self._from_index, query, k)
        docs = docs[:k] if k is not None else docs
        if self.warm:
            await awarm_quietly(self.backend, [d.page_content for d in docs])
        return docs


_ROLES = {"system": "system", "human": "user", "ai": "assistant"}  # tool results and the rest count as user turns


def _message_text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


class ChatRagkv(BaseChatModel):
    """A chat model answered by ragkv's middleware from the documents in its input."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    backend: Any = Field(default=None, description="LocalBackend/HttpBackend; or give base_url (+ api_key)")
    model_name: str = Field(default="ragkv", alias="model")
    base_url: str | None = Field(default_factory=from_env("RAGKV_URL", default=None),
                                 description="A ragkv service, when no backend is given (env RAGKV_URL)")
    api_key: SecretStr | None = Field(default_factory=secret_from_env("RAGKV_API_KEY", default=None),
                                      description="Its API key (env RAGKV_API_KEY)")
    temperature: float | None = Field(default=None, ge=0, description="0 or None: greedy")
    max_tokens: int | None = Field(default=64, ge=1)
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float | None = None
    max_retries: int = 2
    streaming: bool = False
    strategy: str | None = Field(default=None, description="full | prefix | reuse | blend | compress | auto")
    strategy_params: dict[str, Any] = Field(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "ragkv-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "strategy": self.strategy, "temperature": self.temperature,
                "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="ragkv", ls_model_name=str(kwargs.get("model", self.model_name)),
                                 ls_model_type="chat", ls_temperature=self.temperature,
                                 ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = stops
        return params

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def _backend(self) -> Any:
        if self.backend is not None:
            return self.backend
        if self.base_url is not None:
            key = self.api_key.get_secret_value() if self.api_key is not None else None
            from ragkv.integrations.client import RagkvClient

            self.backend = HttpBackend(RagkvClient(self.base_url, key, timeout_s=self.timeout or 300.0))
            return self.backend
        raise ConfigError("ChatRagkv needs backend= (LocalBackend/HttpBackend) or base_url=")

    def _settings(self, stop: list[str] | None, kwargs: dict[str, Any]) -> AnswerSettings:
        stops = tuple(stop if stop is not None else (self.stop or ()))
        options = GenerationOptions(max_new_tokens=int(kwargs.get("max_tokens", self.max_tokens or 64)),
                                    temperature=kwargs.get("temperature", self.temperature),
                                    top_p=kwargs.get("top_p", self.top_p), top_k=kwargs.get("top_k", self.top_k),
                                    seed=kwargs.get("seed", self.seed), stop=stops)
        return AnswerSettings(options, kwargs.get("strategy", self.strategy),
                              kwargs.get("strategy_params", self.strategy_params))

    def _split(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> Any:
        backend = self._backend()
        explicit: Sequence[Any] = kwargs.get("documents") or ()
        documents = [d.page_content if isinstance(d, Document) else str(d) for d in explicit]
        turns = [(_ROLES.get(m.type, "user"), _message_text(m)) for m in messages]
        return split_chat(turns, documents + backend.registry.texts())

    @staticmethod
    def _metadata(answer: Answer, model: str) -> dict[str, Any]:
        return {"model_name": model, "finish_reason": answer.finish_reason, "ttft_ms": answer.ttft_s * 1e3,
                "timings_ms": dict(answer.timings_ms), "strategy": answer.strategy,
                "documents": [d.to_dict() for d in answer.documents], "model_provider": "ragkv"}

    @staticmethod
    def _usage(answer: Answer) -> dict[str, int]:
        return {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens}

    def _result(self, answer: Answer) -> ChatResult:
        message = AIMessage(content=answer.text, response_metadata=self._metadata(answer, self.model_name),
                            usage_metadata=self._usage(answer))  # type: ignore[arg-type]
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _final_chunk(self, answer: Answer) -> ChatGenerationChunk:
        extra: dict[str, Any] = {}
        if "chunk_position" in AIMessageChunk.model_fields:  # langchain-core >= 1.0 marks the end of a stream
            extra["chunk_position"] = "last"
        return ChatGenerationChunk(message=AIMessageChunk(
            content="", response_metadata=self._metadata(answer, self.model_name),
            usage_metadata=self._usage(answer), **extra))  # type: ignore[arg-type]

    # -- the four entry points ----------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        answer = self._backend().answer(self._split(messages, kwargs), self._settings(stop, kwargs))
        return self._result(answer)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        answer = await self._backend().aanswer(self._split(messages, kwargs), self._settings(stop, kwargs))
        return self._result(answer)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for item in self._backend().stream(self._split(messages, kwargs), self._settings(stop, kwargs)):
            if isinstance(item, Answer):
                yield self._final_chunk(item)
                continue
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
            if run_manager is not None:
                run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
                       ) -> AsyncIterator[ChatGenerationChunk]:
        async for item in self._backend().astream(self._split(messages, kwargs), self._settings(stop, kwargs)):
            if isinstance(item, Answer):
                yield self._final_chunk(item)
                continue
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
            if run_manager is not None:
                await run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk


def format_documents(docs: Sequence[Document]) -> str:
    """The usual ``format_docs`` of RAG chains: page contents separated by blank lines."""
    return "\n\n".join(d.page_content for d in docs)


__all__ = ["ChatRagkv", "RagkvRetriever", "format_documents"]
