"""The LangChain and LlamaIndex adapters against a running ragkv service (HttpBackend + RagkvClient)."""
from __future__ import annotations

import uuid
from typing import Any

import pytest

from ragkv.integrations.backends import HttpBackend
from ragkv.integrations.client import RagkvClient, RagkvHTTPError


@pytest.fixture()
def http_backend(service: Any) -> HttpBackend:
    return HttpBackend(RagkvClient(service.url, service.keys["bob"]))


def test_client_round_trips(service: Any) -> None:
    with RagkvClient(service.url, service.keys["bob"]) as client:
        text = f"k1 v2 ; client {uuid.uuid4().hex[:6]}"
        key = client.warm([text])["keys"][0]
        assert client.lookup([key])[0]["present"] and client.get_chunk(key)
        blob = client.get_chunk(key) or b""
        with pytest.raises(RagkvHTTPError) as refused:
            client.put_chunk("bob:copy", blob)  # a blob goes only under the content key it was made for
        assert refused.value.status == 422
        assert client.delete_chunk(key) and not client.delete_chunk(key)
        assert client.put_chunk(key, blob)["key"] == key and client.get_chunk(key) == blob
        assert client.get_chunk("bob:absent") is None
        out = client.generate("Q k1 ?", [text], max_new_tokens=2)
        assert out["documents"][0]["hit"]
        streamed = list(client.stream("Q k1 ?", [text], max_new_tokens=2))
        assert "".join(p for p in streamed if isinstance(p, str)) == streamed[-1]["answer"] == out["answer"]
        with pytest.raises(RagkvHTTPError) as err:
            client.get_chunk("alice:secret")
        assert err.value.status == 403
    with pytest.raises(RagkvHTTPError) as err:
        RagkvClient(service.url, "sk-wrong").stats()
    assert err.value.status == 401


@pytest.mark.asyncio
async def test_async_calls_share_one_connection_pool(service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from ragkv.integrations import client as client_module

    made: list[httpx.AsyncClient] = []

    class CountingClient(httpx.AsyncClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(client_module.httpx, "AsyncClient", CountingClient)
    async with RagkvClient(service.url, service.keys["bob"]) as client:
        await client.awarm([f"k3 v4 ; pool {uuid.uuid4().hex[:6]}"])
        answer = await client.agenerate("Q k3 ?", max_new_tokens=1)
        pieces = [p async for p in client.astream("Q k3 ?", max_new_tokens=1)]
        assert answer["answer"] is not None and isinstance(pieces[-1], dict)
        assert len(made) == 1 and not made[0].is_closed  # one pool for every async call
    assert made[0].is_closed  # closed with the client


def test_langchain_chain_over_http(http_backend: HttpBackend) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore

    from ragkv.integrations.langchain_adapter import ChatRagkv, RagkvRetriever, format_documents

    texts = [f"k{i} v{i + 1} ; remote {uuid.uuid4().hex[:6]}" for i in range(3)]
    store = InMemoryVectorStore(embedding=DeterministicFakeEmbedding(size=16))
    store.add_texts(texts)
    retriever = RagkvRetriever(backend=http_backend, base_retriever=store.as_retriever(search_kwargs={"k": 3}))
    llm = ChatRagkv(backend=http_backend, max_tokens=2)
    prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\n{question}")])
    chain = {"context": retriever | format_documents, "question": RunnablePassthrough()} | prompt | llm
    message = chain.invoke("Q k1 ?")
    assert len(message.response_metadata["documents"]) == 3
    assert all(d["hit"] and d["key"].startswith("bob:") for d in message.response_metadata["documents"])
    assert "".join(c.content for c in chain.stream("Q k1 ?")) == message.content


@pytest.mark.asyncio
async def test_async_paths_over_http(http_backend: HttpBackend, service: Any) -> None:
    pytest.importorskip("langchain_core")
    from ragkv.integrations.langchain_adapter import ChatRagkv

    text = f"k5 v6 ; async {uuid.uuid4().hex[:6]}"
    await http_backend.awarm([text])
    llm = ChatRagkv(base_url=service.url, api_key=service.keys["bob"], max_tokens=2)
    message = await llm.ainvoke(f"{text}\n\nQ k5 ?")
    llm.backend.registry.add([text])
    again = await llm.ainvoke(f"{text}\n\nQ k5 ?")
    assert again.response_metadata["documents"][0]["hit"]
    pieces = [c.content async for c in llm.astream(f"{text}\n\nQ k5 ?")]
    assert "".join(pieces) == again.content == message.content


def test_llamaindex_engine_over_http(http_backend: HttpBackend) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.query_engine import RetrieverQueryEngine

    from ragkv.integrations.faiss_retriever import FaissIndex, HashingEmbedder
    from ragkv.integrations.llamaindex_adapter import RagkvLlamaRetriever, RagkvLLM

    index = FaissIndex(HashingEmbedder(64))
    index.add([f"k7 v8 ; llama {uuid.uuid4().hex[:6]}", "k9 v10 ; other"])
    retriever = RagkvLlamaRetriever(http_backend, index=index, similarity_top_k=1)
    response = RetrieverQueryEngine.from_args(retriever, llm=RagkvLLM(backend=http_backend, max_new_tokens=1)
                                              ).query("k7 v8")
    assert len(response.source_nodes) == 1 and isinstance(str(response), str)
