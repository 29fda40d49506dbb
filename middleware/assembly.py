"""Context assembly: prompt = start token + optional system prefix + chunks + query, positions assigned here.

Each piece is tokenized on its own; positions are contiguous from 0 (the start token). A cached chunk was
computed at position 1 (behind the start token), so placing it at ``start`` rotates its keys by
``start - 1`` (``LayerFeed`` does it layer by layer, in float32).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.loading import LoadedChunk
from ragkv.middleware.rope import delta_cos_sin, rotate_half

PREFIX, CHUNK, QUERY = "prefix", "chunk", "query"


@dataclass(frozen=True)
class Segment:
    kind: str  # PREFIX | CHUNK | QUERY
    token_ids: tuple[int, ...]
    start: int
    index: int = -1  # chunk index in the request
    key: str | None = None

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class AssembledPrompt:
    segments: tuple[Segment, ...]

    @property
    def input_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    @property
    def length(self) -> int:
        return self.segments[-1].end

    @property
    def prefix(self) -> Segment:
        return self.segments[0]

    @property
    def chunks(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == CHUNK]

    @property
    def query(self) -> Segment:
        return self.segments[-1]

    def rows(self, kinds: Sequence[str] = (CHUNK,), chunk_indices: Sequence[int] | None = None) -> torch.Tensor:
        """Row indices (long, ascending) of the segments of ``kinds`` (optionally only some chunks)."""
        parts = [torch.arange(s.start, s.end) for s in self.segments if s.kind in kinds
                 and (s.kind != CHUNK or chunk_indices is None or s.index in chunk_indices)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def boundaries(self) -> list[int]:
        return [s.end for s in self.segments]


def assemble(prefix_ids: Sequence[int], chunk_ids: Sequence[Sequence[int]], query_ids: Sequence[int],
             keys: Sequence[str | None] | None = None) -> AssembledPrompt:
    """Lay out the pieces; ``prefix_ids`` starts with the start token. The query must not be empty."""
    if not prefix_ids:
        raise ConfigError("the prefix must hold at least the start token")
    if not query_ids:
        raise ConfigError("the query must contain at least one token")
    segments = [Segment(PREFIX, tuple(prefix_ids), 0)]
    pos = len(prefix_ids)
    for i, ids in enumerate(chunk_ids):
        segments.append(Segment(CHUNK, tuple(ids), pos, i, None if keys is None else keys[i]))
        pos += len(ids)
    segments.append(Segment(QUERY, tuple(query_ids), pos))
    return AssembledPrompt(tuple(segments))


class LayerFeed:
    """Fills a layer's sequence KV ``[2, 1, H, N, D]`` with the exact prefix and the cached chunks, each moved
    from its cached position to its place (keys rotated in float32). Waits on pipelined loads per layer."""

    def __init__(self, adapter: ModelAdapter, prompt: AssembledPrompt, prefix_kv: torch.Tensor | None,
                 loaded: Mapping[int, LoadedChunk]) -> None:
        self.adapter = adapter
        self.prompt = prompt
        self.prefix_kv = prefix_kv  # [L, 2, 1, H, P, D]
        self.loaded = loaded  # chunk index -> loaded chunk
        self.wait_seconds = 0.0
        inv_freq = adapter.inv_freq
        self._rot: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for seg in prompt.chunks:
            chunk = loaded.get(seg.index)
            if chunk is not None:
                delta = seg.start - chunk.meta.position
                if delta not in self._rot:
                    cos, sin = delta_cos_sin(inv_freq, delta)
                    self._rot[delta] = (cos.to(adapter.device), sin.to(adapter.device))

    def fill(self, layer: int, kv_layer: torch.Tensor) -> None:
        """kv_layer: [2, 1, H, N, D] (a view into the sequence buffer), written in place."""
        if self.prefix_kv is not None:
            p = self.prefix_kv.shape[4]
            kv_layer[:, :, :, :p] = self.prefix_kv[layer]
        for seg in self.prompt.chunks:
            chunk = self.loaded.get(seg.index)
            if chunk is None:
                continue
            start = time.perf_counter()
            src = chunk.layer(layer).to(kv_layer.device, non_blocking=True)  # [2, H, T, D]
            self.wait_seconds += time.perf_counter() - start
            delta = seg.start - chunk.meta.position
            keys = src[0]
            if delta != 0:
                cos, sin = self._rot[delta]
                k32 = keys.to(torch.float32)
                keys = k32 * cos + rotate_half(k32) * sin
            kv_layer[0, 0, :, seg.start:seg.end] = keys
            kv_layer[1, 0, :, seg.start:seg.end] = src[1]


class StaticFeed:
    """A feed over an already assembled KV [L, 2, 1, H, N, D] (used after pruning)."""

    def __init__(self, kv: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.kv = kv
        self.rows = rows  # slots to copy (None: all); other slots are computed by the caller
        self.wait_seconds = 0.0

    def fill(self, layer: int, kv_layer: torch.Tensor) -> None:
        if self.rows is None:
            kv_layer.copy_(self.kv[layer])
        else:
            kv_layer[:, :, :, self.rows] = self.kv[layer][:, :, :, self.rows]


__all__ = ["CHUNK", "PREFIX", "QUERY", "AssembledPrompt", "LayerFeed", "Segment", "StaticFeed", "assemble"]
