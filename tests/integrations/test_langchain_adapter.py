"""LangChain: the standard suites (RetrieversIntegrationTests for the wrapper and the built-in index,
ChatModelUnitTests for the chat model) and a full LCEL RAG chain that hits the cache."""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from ragkv.integrations.backends import LocalBackend
from ragkv.integrations.faiss_retriever import FaissIndex, HashingEmbedder
from ragkv.integrations.langchain_adapter import ChatRagkv, RagkvRetriever, format_documents
from ragkv.integrations.models import KIND_BUNDLED

CORPUS = ["k1 v2 ; the k3 v4 ;", "k5 v6 ; of k7 v8 ;", "k9 v10 ; and k11 v12 ;", "k13 v14 ; see k15 v16 ;",
          "k17 v18 ; to k19 v20 ;", "k21 v22 ; in k23 v24 ;"]
_SHARED: dict[str, Any] = {}


@pytest.fixture(autouse=True, scope="module")
def _langchain_backend(tiny_runtime: Any) -> None:
    _SHARED["backend"] = LocalBackend(tiny_runtime, namespace="langchain")
    store = InMemoryVectorStore(embedding=DeterministicFakeEmbedding(size=32))
    store.add_texts(CORPUS)
    _SHARED["vectorstore"] = store
    index = FaissIndex(HashingEmbedder(128))
    index.add(CORPUS)
    _SHARED["index"] = index


class TestWrappedRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[RagkvRetriever]:
        return RagkvRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        base = _SHARED["vectorstore"].as_retriever(search_kwargs={"k": len(CORPUS)})
        return {"backend": _SHARED["backend"], "base_retriever": base}

    @property
    def retriever_query_example(self) -> str:
        return "Q k5 ?"


class TestBuiltinIndexRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[RagkvRetriever]:
        return RagkvRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"backend": _SHARED["backend"], "index": _SHARED["index"], "k": 4}

    @property
    def retriever_query_example(self) -> str:
        return "k9 v10"


class TestChatRagkvStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatRagkv]:
        return ChatRagkv

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"backend": _SHARED["backend"], "model": "ragkv-tiny"}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return ({"RAGKV_URL": "http://127.0.0.1:9", "RAGKV_API_KEY": "sk-env"}, {},
                {"base_url": "http://127.0.0.1:9", "api_key": "sk-env"})


def test_wrapper_returns_base_documents_unchanged_and_warms_them(tiny_runtime: Any) -> None:
    base = _SHARED["vectorstore"].as_retriever(search_kwargs={"k": 3})
    retriever = RagkvRetriever(backend=_SHARED["backend"], base_retriever=base)
    expected = base.invoke("Q k1 ?")
    got = retriever.invoke("Q k1 ?")
    assert got == expected  # drop-in: same documents, same order, same metadata
    keys = [tiny_runtime.key_for(d.page_content, "langchain") for d in got]
    assert all(tiny_runtime.store.contains(k) for k in keys)
    with pytest.raises(ValueError, match="exactly one"):  # pydantic wraps the ConfigError (a ValueError)
        RagkvRetriever(backend=_SHARED["backend"])  # neither a base retriever nor an index


def test_lcel_rag_chain_answers_from_cached_documents(tiny_runtime: Any, sample: Any) -> None:
    q = next(q for q in sample.questions if q.kind == "inside")
    store = InMemoryVectorStore(embedding=DeterministicFakeEmbedding(size=32))
    store.add_texts(list(q.chunks))
    retriever = RagkvRetriever(backend=_SHARED["backend"],
                               base_retriever=store.as_retriever(search_kwargs={"k": len(q.chunks)}))
    llm = ChatRagkv(backend=_SHARED["backend"], max_tokens=1)
    prompt = ChatPromptTemplate.from_messages([("system", "{context}"), ("human", "{question}")])
    chain = {"context": retriever | format_documents, "question": RunnablePassthrough()} | prompt | llm
    message = chain.invoke(q.question)
    documents = message.response_metadata["documents"]
    assert len(documents) == len(q.chunks) and all(d["hit"] for d in documents)  # warmed by the retriever
    assert message.response_metadata["ttft_ms"] > 0 and message.usage_metadata["output_tokens"] == 1
    text_chain = chain | StrOutputParser()
    assert text_chain.invoke(q.question) == message.content
    assert "".join(text_chain.stream(q.question)) == message.content
    if tiny_runtime.info.kind == KIND_BUNDLED:  # pragma: no cover - the test runtime is the tiny model
        assert message.content.strip() == q.answer


async def test_async_chain_and_explicit_documents(tiny_runtime: Any) -> None:
    llm = ChatRagkv(backend=_SHARED["backend"], max_tokens=2, strategy="reuse")
    retriever = RagkvRetriever(backend=_SHARED["backend"], index=_SHARED["index"], k=2)
    docs = await retriever.ainvoke("k13 v14")
    assert len(docs) == 2 and all(isinstance(d, Document) for d in docs)
    prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\nQ k13 ?")])
    chain = {"context": retriever | format_documents} | prompt | llm
    message = await chain.ainvoke("k13 v14")
    assert all(d["hit"] for d in message.response_metadata["documents"])
    assert message.response_metadata["strategy"] == "reuse"
    chunks = [c async for c in llm.astream("k99 v1 ; plain question", documents=["k99 v1 ;"])]
    whole = sum(chunks[1:], chunks[0])
    assert whole.response_metadata["documents"][0]["tokens"] == 3 and whole.usage_metadata["output_tokens"] == 2


async def test_concurrent_async_calls_are_decoded_in_one_batch(tiny_runtime: Any) -> None:
    llm = ChatRagkv(backend=_SHARED["backend"], max_tokens=12, strategy="reuse", stop=[])
    scheduler = tiny_runtime.scheduler
    before = Counter(scheduler.batch_sizes)
    questions = [f"k{20 + i} v1 ; question {i}" for i in range(5)]
    alone = [await llm.ainvoke(q, documents=["k20 v1 ;"]) for q in questions[:2]]

    async def streamed(q: str) -> str:
        return "".join([str(c.content) async for c in llm.astream(q, documents=["k20 v1 ;"])])

    together = await asyncio.gather(*(llm.ainvoke(q, documents=["k20 v1 ;"]) for q in questions),
                                    *(streamed(q) for q in questions[:2]))
    assert [m.content for m in together[:2]] == [m.content for m in alone]  # greedy: batching changes nothing
    assert list(together[5:]) == [m.content for m in alone]
    grown = Counter(scheduler.batch_sizes) - before
    assert max(grown) >= 2  # the concurrent calls shared decode steps
