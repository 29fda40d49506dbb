"""A document left out by its abstract is visible per document through the runtime, LangChain and LlamaIndex."""
from __future__ import annotations

from typing import Any

from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions
from ragkv.integrations.backends import LocalBackend
from ragkv.integrations.langchain_adapter import ChatRagkv
from ragkv.integrations.llamaindex_adapter import RagkvLLM
from ragkv.integrations.runtime import RagRuntime
from ragkv.kvstore import TieredStore
from ragkv.middleware.abstract_selection import AbstractsConfig
from ragkv.middleware.abstracts import abstract_key

LEAVE_OUT = AbstractsConfig(enabled=True, layers=2, threshold=0.0, min_chunks=3, min_kept=1)
TEXTS = [" ".join(f"k{(i * 5 + j) % 64} v{(i * 11 + 3 * j) % 64} ;" for j in range(12)) for i in range(4)]


def _skipped(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in documents if d["source"] == "skipped"]


def test_the_runtime_reports_left_out_documents_and_deletes_abstracts_with_chunks(tiny_loaded: Any) -> None:
    with RagRuntime(tiny_loaded, TieredStore("host:64MB"), own_store=True, abstracts=LEAVE_OUT,
                    use_calibration=False) as runtime:
        runtime.warm(TEXTS, "alice")
        request = AnswerRequest(query="Q k5 ?", documents=[Document(text=t) for t in TEXTS], namespace="alice",
                                strategy="reuse", generation=GenerationOptions(max_new_tokens=2))
        answer = runtime.answer(request)
        skipped = [d for d in answer.documents if d.source == "skipped"]
        assert len(skipped) == 3 and all(d.abstract_gap < 0 and not d.hit for d in skipped)
        summary = runtime.abstracts_summary()
        assert summary["enabled"] and summary["chunks_skipped"] == 3 and summary["written"] == 4
        key = runtime.key_for(TEXTS[0], "alice")
        assert runtime.delete_chunk(key) and not runtime.store.contains(abstract_key(key))
    with RagRuntime(tiny_loaded, TieredStore("host:64MB"), own_store=True, use_calibration=False) as plain:
        assert plain.abstracts_summary()["enabled"] is False  # off by default


def test_left_out_documents_show_in_both_frameworks(tiny_loaded: Any) -> None:
    with RagRuntime(tiny_loaded, TieredStore("host:64MB"), own_store=True, abstracts=LEAVE_OUT,
                    use_calibration=False) as runtime:
        backend = LocalBackend(runtime, namespace="ab")
        backend.warm(TEXTS)
        message = ChatRagkv(backend=backend, max_tokens=2, strategy="reuse").invoke(
            "\n\n".join(TEXTS) + "\n\nQ k5 ?", documents=TEXTS)
        docs = message.response_metadata["documents"]
        assert len(docs) == 4 and len(_skipped(docs)) == 3
        assert all(d["abstract_gap"] is not None for d in docs)
        response = RagkvLLM(backend=backend, max_tokens=2, strategy="reuse").complete(
            "\n\n".join(TEXTS) + "\n\nQ k9 ?")
        assert len(_skipped(response.raw["documents"])) == 3
