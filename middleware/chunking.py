"""Chunk caching: tokenize each chunk on its own, prefill it behind the start token, store it as ``ChunkKV``.

A chunk is tokenized alone (its text plus the prompt layout's separator, no special tokens), so the same
chunk always yields the same token ids and the same key. Its KV is computed as ``[start] + chunk`` at positions ``0 .. T`` and the
start token's KV is dropped, so the stored KV begins at ``position = 1``. Chunks are prefilled in batches
(right-padded; under the exact causal mask padding after a row's tokens never affects them). Each token's
importance (the attention it receives inside its chunk) is stored with the KV unless switched off.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ragkv.kvstore.chunk import DEFAULT_NAMESPACE, ChunkKV, ChunkMeta, check_namespace, chunk_key
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.importance import ReceivedAttention

CHUNK_POSITION = 1  # the start token sits at position 0


@dataclass(frozen=True)
class ChunkingConfig:
    """How chunks are prefilled: at most ``batch_size`` chunks and ``max_batch_tokens`` padded tokens per batch."""

    batch_size: int = 8
    max_batch_tokens: int = 16384
    # score each token by the attention it receives inside its chunk and store the scores with the KV
    # (``ragkv.middleware.importance``; read by ``BlendConfig(rule="stored")``)
    store_importance: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_batch_tokens < 2:
            raise ConfigError(f"max_batch_tokens must be >= 2, got {self.max_batch_tokens}")


@dataclass
class WarmReport:
    """What ``ChunkCacher.warm`` did: one key per input chunk, in order."""

    keys: list[str] = field(default_factory=list)
    computed: int = 0
    already_cached: int = 0
    tokens_computed: int = 0
    seconds: float = 0.0


class ChunkCacher:
    """Turns chunk texts (or token ids) into stored ``ChunkKV`` entries, keyed by content."""

    def __init__(self, adapter: ModelAdapter, store: Any, config: ChunkingConfig = ChunkingConfig(),
                 separator: str = "") -> None:
        self.adapter = adapter
        self.store = store
        self.config = config
        self.separator = separator  # the prompt layout's text after each document (part of its tokens)
        self.observer: Callable[[str, Sequence[int]], None] | None = None  # told of every chunk a warm stores or finds
        self.on_stored: Callable[[str, ChunkKV, float | None], None] | None = None  # told of each chunk a warm stores

    def tokens(self, chunk: str | Sequence[int]) -> list[int]:
        """A text chunk's token ids (text + separator, tokenized alone); token ids are taken as they are."""
        ids = self.adapter.encode(chunk + self.separator) if isinstance(chunk, str) else [int(t) for t in chunk]
        if not ids:
            raise ConfigError("a chunk must contain at least one token")
        return ids

    def key(self, token_ids: Sequence[int], namespace: str = DEFAULT_NAMESPACE) -> str:
        return chunk_key(self.adapter.fingerprint, namespace, token_ids)

    def meta(self, token_ids: Sequence[int], importance: tuple[int, ...] = ()) -> ChunkMeta:
        return ChunkMeta(fingerprint=str(self.adapter.fingerprint), token_ids=tuple(token_ids),
                         position=CHUNK_POSITION, dtype=self.adapter.dtype_name, rope=True, importance=importance)

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # similar lengths together: less padding
        batches: list[list[int]] = []
        for i in order:
            if batches:
                cur = batches[-1]
                width = 1 + lengths[cur[0]]  # the first is the longest
                if len(cur) < self.config.batch_size and width * (len(cur) + 1) <= self.config.max_batch_tokens:
                    cur.append(i)
                    continue
            batches.append([i])
        return batches

    @torch.no_grad()
    def compute(self, token_lists: Sequence[Sequence[int]]) -> list[ChunkKV]:
        """Prefill each chunk alone behind the start token, in batches; returns one ``ChunkKV`` per input."""
        adapter = self.adapter
        lengths = [len(t) for t in token_lists]
        if any(n == 0 for n in lengths):
            raise ConfigError("a chunk must contain at least one token")
        results: list[ChunkKV | None] = [None] * len(token_lists)
        for batch in self._batches(lengths):
            width = 1 + max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), adapter.start_token_id, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, 1:1 + lengths[i]] = torch.as_tensor(list(token_lists[i]), dtype=torch.long)
            received = ReceivedAttention(adapter, [1 + lengths[i] for i in batch], width) \
                if self.config.store_importance else None
            kv = adapter.prefill(ids, observe=received).kv  # [L, 2, B, H, width, D]
            for row, i in enumerate(batch):
                chunk_kv = kv[:, :, row, :, 1:1 + lengths[i]].contiguous()  # [L, 2, H, T, D], start token dropped
                importance = received.scores(row) if received is not None else ()
                results[i] = ChunkKV(chunk_kv, self.meta(token_lists[i], importance))
        return [r for r in results if r is not None]

    def warm(self, chunks: Iterable[str | Sequence[int]], namespace: str = DEFAULT_NAMESPACE,
             skip_cached: bool = True, ttl_s: float | None = None, pin: bool = False) -> WarmReport:
        """Precompute and store the KV of every chunk of a corpus (one call). Already-stored chunks are skipped."""
        check_namespace(namespace)
        start = time.perf_counter()
        report = WarmReport()
        token_lists = [self.tokens(c) for c in chunks]
        report.keys = [self.key(t, namespace) for t in token_lists]
        todo: dict[str, list[int]] = {}
        present = self.store.contains_many(report.keys) if skip_cached else [False] * len(report.keys)
        for key, ids, here in zip(report.keys, token_lists, present):
            if here or key in todo:
                report.already_cached += 1
            else:
                todo[key] = ids
        keys = list(todo)
        step = max(1, self.config.batch_size * 4)
        for lo in range(0, len(keys), step):
            part = keys[lo:lo + step]
            for key, chunk in zip(part, self.compute([todo[k] for k in part])):
                self.store.put(key, chunk, ttl_s=ttl_s)
                if self.on_stored is not None:
                    self.on_stored(key, chunk, ttl_s)
                if pin:
                    self.store.pin(key)
                report.computed += 1
                report.tokens_computed += chunk.num_tokens
        if self.observer is not None:
            for key, ids in zip(report.keys, token_lists):
                self.observer(key, ids)
        report.seconds = time.perf_counter() - start
        return report


__all__ = ["CHUNK_POSITION", "ChunkCacher", "ChunkingConfig", "WarmReport"]
