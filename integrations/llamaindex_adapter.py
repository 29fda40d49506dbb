"""LlamaIndex integration: a retriever wrapper that warms chunk KV, and a ``CustomLLM`` that answers from it.

    backend = LocalBackend(RagRuntime.open())
    retriever = RagkvLlamaRetriever(backend, base_retriever=index.as_retriever())   # or index=FaissIndex
    engine = RetrieverQueryEngine.from_args(retriever, llm=RagkvLLM(backend=backend))

The retriever returns the wrapped retriever's nodes unchanged (at most ``similarity_top_k`` when set) and
warms the KV of each node's text *as the LLM will see it* (``MetadataMode.LLM``: metadata lines included),
so the response synthesizer's prompt contains exactly the warmed chunks. ``RagkvLLM`` finds them in the
prompt (``ragkv.integrations.backends.split_prompt``) and answers with the middleware.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
    )
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
    from pydantic import Field, PrivateAttr
except ImportError as exc:
    raise ImportError("the LlamaIndex integration needs llama-index-core: pip install 'ragkv[llamaindex]'") from exc

from ragkv.integrations.answers import Answer, GenerationOptions
from ragkv.integrations.backends import AnswerSettings, awarm_quietly, split_chat, split_prompt, warm_quietly
from ragkv.kvstore.errors import ConfigError

DEFAULT_TOP_K = 4


def node_text(node: NodeWithScore) -> str:
    """A node's content as response synthesizers put it into prompts."""
    return node.node.get_content(metadata_mode=MetadataMode.LLM)


class RagkvLlamaRetriever(BaseRetriever):
    """Wraps any LlamaIndex retriever (or the built-in FAISS ``index``) and warms what it returns."""

    def __init__(self, backend: Any, base_retriever: BaseRetriever | None = None, index: Any = None,
                 similarity_top_k: int | None = None, warm: bool = True, **kwargs: Any) -> None:
        if (base_retriever is None) == (index is None):
            raise ConfigError("give RagkvLlamaRetriever exactly one of base_retriever= or index=")
        if similarity_top_k is not None and similarity_top_k < 1:
            raise ConfigError(f"similarity_top_k must be >= 1, got {similarity_top_k}")
        super().__init__(**kwargs)
        self.backend = backend
        self.base_retriever = base_retriever
        self.index = index
        self.similarity_top_k = similarity_top_k
        self.warm = warm

    def _from_index(self, query: str) -> list[NodeWithScore]:
        hits = self.index.search(query, self.similarity_top_k or DEFAULT_TOP_K)
        return [NodeWithScore(node=TextNode(text=h.text, metadata=dict(h.metadata), id_=f"ragkv-{h.id}"),
                              score=h.score) for h in hits]

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if self.base_retriever is not None:
            nodes = self.base_retriever.retrieve(query_bundle)
        else:
            nodes = self._from_index(query_bundle.query_str)
        nodes = nodes[:self.similarity_top_k] if self.similarity_top_k is not None else nodes
        if self.warm:
            warm_quietly(self.backend, [node_text(n) for n in nodes])
        return nodes

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if self.base_retriever is not None:
            nodes = await self.base_retriever.aretrieve(query_bundle)
        else:
            nodes = await asyncio.to_thread(self._from_index, query_bundle.query_str)
        nodes = nodes[:self.similarity_top_k] if self.similarity_top_k is not None else nodes
        if self.warm:
            await awarm_quietly(self.backend, [node_text(n) for n in nodes])
        return nodes


class RagkvLLM(CustomLLM):
    """A completion LLM answered by ragkv's middleware from the retrieved nodes in its prompt."""

    model_name: str = Field(default="ragkv")
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    context_window: int = Field(default=4096, ge=16, description="What response synthesizers may fill")
    strategy: str | None = Field(default=None)
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    stop: list[str] = Field(default_factory=list)
    _backend: Any = PrivateAttr()

    def __init__(self, backend: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._backend = backend

    @classmethod
    def class_name(cls) -> str:
        return "RagkvLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           model_name=self.model_name, is_chat_model=False)

    def _settings(self, kwargs: dict[str, Any]) -> AnswerSettings:
        options = GenerationOptions(max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
                                    temperature=kwargs.get("temperature", self.temperature),
                                    stop=tuple(kwargs.get("stop", self.stop)))
        return AnswerSettings(options, kwargs.get("strategy", self.strategy),
                              kwargs.get("strategy_params", self.strategy_params))

    def _split(self, prompt: str, kwargs: dict[str, Any]) -> Any:
        explicit: Sequence[str] = kwargs.get("documents") or ()
        return split_prompt(prompt, list(explicit) + self._backend.registry.texts())

    def _split_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Any:
        explicit: Sequence[str] = kwargs.get("documents") or ()
        turns = [(_ROLES.get(m.role, "user"), m.content or "") for m in messages]
        return split_chat(turns, list(explicit) + self._backend.registry.texts())

    @staticmethod
    def _reply(text: str, delta: str | None = None, raw: dict[str, Any] | None = None) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, raw=raw)

    @staticmethod
    def _raw(answer: Answer) -> dict[str, Any]:
        return {"finish_reason": answer.finish_reason, "ttft_ms": answer.ttft_s * 1e3, "strategy": answer.strategy,
                "timings_ms": dict(answer.timings_ms), "documents": [d.to_dict() for d in answer.documents],
                "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens}}

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self._backend.answer(self._split(prompt, kwargs), self._settings(kwargs))
        return CompletionResponse(text=answer.text, raw=self._raw(answer))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = await self._backend.aanswer(self._split(prompt, kwargs), self._settings(kwargs))
        return CompletionResponse(text=answer.text, raw=self._raw(answer))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        split, settings = self._split(prompt, kwargs), self._settings(kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for item in self._backend.stream(split, settings):
                if isinstance(item, Answer):
                    yield CompletionResponse(text=text, delta="", raw=self._raw(item))
                else:
                    text += item
                    yield CompletionResponse(text=text, delta=item)

        return gen()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any
                               ) -> CompletionResponseAsyncGen:
        split, settings = self._split(prompt, kwargs), self._settings(kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for item in self._backend.astream(split, settings):
                if isinstance(item, Answer):
                    yield CompletionResponse(text=text, delta="", raw=self._raw(item))
                else:
                    text += item
                    yield CompletionResponse(text=text, delta=item)

        return gen()


    # -- chat: messages keep their roles and order (the chat template renders them) ------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = self._backend.answer(self._split_chat(messages, kwargs), self._settings(kwargs))
        return self._reply(answer.text, raw=self._raw(answer))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = await self._backend.aanswer(self._split_chat(messages, kwargs), self._settings(kwargs))
        return self._reply(answer.text, raw=self._raw(answer))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        split, settings = self._split_chat(messages, kwargs), self._settings(kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            for item in self._backend.stream(split, settings):
                if isinstance(item, Answer):
                    yield self._reply(text, "", self._raw(item))
                else:
                    text += item
                    yield self._reply(text, item)

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        split, settings = self._split_chat(messages, kwargs), self._settings(kwargs)

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for item in self._backend.astream(split, settings):
                if isinstance(item, Answer):
                    yield self._reply(text, "", self._raw(item))
                else:
                    text += item
                    yield self._reply(text, item)

        return gen()


_ROLES = {MessageRole.SYSTEM: "system", MessageRole.USER: "user", MessageRole.ASSISTANT: "assistant"}

__all__ = ["RagkvLLM", "RagkvLlamaRetriever", "node_text"]
