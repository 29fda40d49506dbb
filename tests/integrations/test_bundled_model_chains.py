"""With the toy model (the registry's ``toy``): framework chains over the sample corpus answer correctly from the cache."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions
from ragkv.integrations.backends import LocalBackend
from ragkv.integrations.models import TOY_MODEL, load_model
from ragkv.integrations.runtime import RagRuntime


@pytest.fixture(scope="module")
def bundled_backend() -> Iterator[LocalBackend]:
    from ragkv.kvstore import TieredStore

    runtime = RagRuntime(load_model(TOY_MODEL), TieredStore("host:256MB"), own_store=True)
    yield LocalBackend(runtime, namespace="bundled")
    runtime.close()


def _direct(backend: LocalBackend, q: Any) -> str:
    request = AnswerRequest(query=q.question, documents=[Document(text=c) for c in q.chunks], namespace="bundled",
                            readable_namespaces=frozenset({"bundled"}), generation=GenerationOptions(max_new_tokens=1))
    return backend.runtime.answer(request).text


def test_lcel_chain_answers_the_sample_like_the_middleware(bundled_backend: LocalBackend, sample: Any) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document as LcDocument
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnablePassthrough

    from ragkv.integrations.langchain_adapter import ChatRagkv, RagkvRetriever, format_documents

    class InOrder(BaseRetriever):
        texts: list[str]

        def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun
                                    ) -> list[LcDocument]:
            return [LcDocument(page_content=t) for t in self.texts]

    llm = ChatRagkv(backend=bundled_backend, max_tokens=1)
    prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\n{question}")])
    for q in sample.questions[:4]:
        retriever = RagkvRetriever(backend=bundled_backend, base_retriever=InOrder(texts=list(q.chunks)))
        chain = {"context": retriever | format_documents, "question": RunnablePassthrough()} | prompt | llm
        message = chain.invoke(q.question)
        assert all(d["hit"] for d in message.response_metadata["documents"])
        assert message.content == _direct(bundled_backend, q)
    first = sample.questions[0]
    retriever = RagkvRetriever(backend=bundled_backend, base_retriever=InOrder(texts=list(first.chunks)))
    chain = {"context": retriever | format_documents, "question": RunnablePassthrough()} | prompt | llm
    assert chain.invoke(first.question).content == first.answer


def test_llamaindex_engine_answers_the_sample(bundled_backend: LocalBackend, sample: Any) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core import PromptTemplate
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from ragkv.integrations.llamaindex_adapter import RagkvLlamaRetriever, RagkvLLM

    first = sample.questions[0]

    class InOrder(BaseRetriever):
        def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
            return [NodeWithScore(node=TextNode(text=t), score=1.0) for t in first.chunks]

    engine = RetrieverQueryEngine.from_args(
        RagkvLlamaRetriever(bundled_backend, base_retriever=InOrder()),
        llm=RagkvLLM(backend=bundled_backend, max_new_tokens=1),
        text_qa_template=PromptTemplate("{context_str}\n\n{query_str}"))
    assert str(engine.query(first.question)).strip() == first.answer
