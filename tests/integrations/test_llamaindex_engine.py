"""LlamaIndex: the retriever wrapper and RagkvLLM inside a real RetrieverQueryEngine (sync, async, streaming),
and the built-in FAISS index as the retriever."""
from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from ragkv.integrations.backends import LocalBackend
from ragkv.integrations.faiss_retriever import FaissIndex, HashingEmbedder
from ragkv.integrations.llamaindex_adapter import RagkvLlamaRetriever, RagkvLLM, node_text
from ragkv.integrations.models import KIND_BUNDLED
from ragkv.kvstore import ConfigError


class FixedRetriever(BaseRetriever):
    """A plain LlamaIndex retriever: returns the given texts (with metadata on the first) in order."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.texts = texts

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [NodeWithScore(node=TextNode(text=t, id_=f"n{i}", metadata={"source": "s"} if i == 0 else {}),
                              score=1.0 - i / 10) for i, t in enumerate(self.texts)]


class RecordingBackend(LocalBackend):
    """A LocalBackend that keeps the answers it gave, so the test can see what the cache did."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: list[Any] = []

    def answer(self, prompt: Any, settings: Any) -> Any:
        result = super().answer(prompt, settings)
        self.answers.append(result)
        return result


@pytest.fixture(scope="module")
def backend(tiny_runtime: Any) -> RecordingBackend:
    return RecordingBackend(tiny_runtime, namespace="llamaindex")


def test_query_engine_answers_from_cached_nodes(backend: RecordingBackend, tiny_runtime: Any, sample: Any) -> None:
    q = next(q for q in sample.questions if q.kind == "inside")
    retriever = RagkvLlamaRetriever(backend, base_retriever=FixedRetriever(list(q.chunks)))
    engine = RetrieverQueryEngine.from_args(retriever, llm=RagkvLLM(backend=backend, max_new_tokens=1))
    response = engine.query(q.question)
    assert [n.node.get_content() for n in response.source_nodes] == list(q.chunks)  # unchanged nodes
    answer = backend.answers[-1]
    # every node (the first with its metadata line, as the synthesizer formats it) came from the cache
    cached = [d for d in answer.documents if d.hit]
    assert len(cached) >= len(q.chunks)
    expected_keys = {tiny_runtime.key_for(node_text(n), "llamaindex") for n in response.source_nodes}
    assert expected_keys <= {d.key for d in cached}
    assert str(response) == answer.text
    if tiny_runtime.info.kind == KIND_BUNDLED:  # pragma: no cover - the test runtime is the tiny model
        assert str(response).strip() == q.answer


async def test_async_and_streaming_query_engine(backend: RecordingBackend) -> None:
    texts = ["k1 v2 ; the k3 v4 ;", "k5 v6 ; of k7 v8 ;"]
    retriever = RagkvLlamaRetriever(backend, base_retriever=FixedRetriever(texts), similarity_top_k=1)
    llm = RagkvLLM(backend=backend, max_new_tokens=3)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm)
    response = await engine.aquery("Q k1 ?")
    assert len(response.source_nodes) == 1  # similarity_top_k honoured
    streaming = RetrieverQueryEngine.from_args(retriever, llm=llm, streaming=True)
    streamed = streaming.query("Q k1 ?")
    assert "".join(streamed.response_gen) == str(response)


def test_builtin_index_as_the_retriever(backend: RecordingBackend) -> None:
    index = FaissIndex(HashingEmbedder(128))
    index.add(["k9 v10 ; and k11 v12 ;", "k13 v14 ; see k15 v16 ;", "k17 v18 ; to k19 v20 ;"])
    retriever = RagkvLlamaRetriever(backend, index=index, similarity_top_k=2)
    nodes = retriever.retrieve("k13 v14")
    assert len(nodes) == 2 and nodes[0].node.get_content() == "k13 v14 ; see k15 v16 ;"
    engine = RetrieverQueryEngine.from_args(retriever, llm=RagkvLLM(backend=backend, max_new_tokens=1))
    engine.query("k13 v14")
    assert all(d.hit for d in backend.answers[-1].documents if d.tokens >= 5)
    with pytest.raises(ConfigError, match="exactly one"):
        RagkvLlamaRetriever(backend)
