"""A near-duplicate document is visible per document through LangChain and LlamaIndex, as through REST."""
from __future__ import annotations

from typing import Any

from ragkv.integrations.backends import LocalBackend
from ragkv.integrations.langchain_adapter import ChatRagkv
from ragkv.integrations.llamaindex_adapter import RagkvLLM
from ragkv.integrations.runtime import RagRuntime
from ragkv.kvstore import TieredStore


def test_a_near_duplicate_shows_in_both_frameworks(tiny_loaded: Any) -> None:
    original = " ".join(f"k{i % 60} v{(i * 7) % 60} ;" for i in range(40))
    with RagRuntime(tiny_loaded, TieredStore("host:64MB"), own_store=True, near_duplicates=True,
                    use_calibration=False) as runtime:
        backend = LocalBackend(runtime, namespace="nd")
        backend.warm([original])
        source = runtime.key_for(original, "nd")

        edited = original.replace("k5 v35 ;", "k6 v35 ;", 1)
        message = ChatRagkv(backend=backend, max_tokens=2, strategy="reuse").invoke(f"{edited}\n\nQ k5 ?",
                                                                               documents=[edited])
        docs = message.response_metadata["documents"]
        assert [d["source"] for d in docs] == ["near-duplicate"] and docs[0]["near_duplicate_of"] == source

        other = original.replace("k9 v3 ;", "k8 v3 ;", 1)
        backend.registry.add([other])
        response = RagkvLLM(backend=backend, max_tokens=2, strategy="reuse").complete(f"{other}\n\nQ k9 ?")
        near = [d for d in response.raw["documents"] if d["source"] == "near-duplicate"]
        assert len(near) == 1 and near[0]["near_duplicate_of"] == source and near[0]["repaired_tokens"] > 0
