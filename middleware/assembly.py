"""Context assembly: prompt = start token + optional system prefix + chunks + query, positions assigned here.

Each piece is tokenized on its own; positions are contiguous from 0 (the start token). A cached chunk was
computed at position 1 (behind the start token), so placing it at ``start`` rotates its keys by
``start - 1`` (``LayerFeed`` does it layer by layer, in float32).
"""
from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

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

    def without_chunks(self, indices: Collection[int]) -> AssembledPrompt:
        """This prompt with the chunks of ``indices`` left out; the others keep their index and key, moved up."""
        segments, pos = [], 0
        for s in self.segments:
            if s.kind == CHUNK and s.index in indices:
                continue
            segments.append(replace(s, start=pos))
            pos += s.length
        return AssembledPrompt(tuple(segments))

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
    from its cached position to its place (keys rotated in float32). Waits on pipelined loads per layer.

    The rotation is one vectorised step per layer over the span of rows holding cached chunks, with a
    per-row cos/sin table (rows not holding a cached chunk get the identity; they are computed anyway).
    """

    def __init__(self, adapter: ModelAdapter, prompt: AssembledPrompt, prefix_kv: torch.Tensor | None,
                 loaded: Mapping[int, LoadedChunk]) -> None:
        self.adapter = adapter
        self.prompt = prompt
        self.prefix_kv = prefix_kv  # [L, 2, 1, H, P, D]
        self.loaded = loaded  # chunk index -> loaded chunk
        self.wait_seconds = 0.0
        self.segments = [s for s in prompt.chunks if s.index in loaded]
        self._span: tuple[int, int] | None = None
        self._cos = self._sin = torch.empty(0)
        self._rotation_ready = False

    def _prepare_rotation(self) -> None:
        """Per-row cos/sin over the span of moved chunks (waits for the stored positions of pipelined loads)."""
        self._rotation_ready = True
        positions = {s.index: self.loaded[s.index].wait_meta().position for s in self.segments}
        moved = [s for s in self.segments if s.start != positions[s.index]]
        if not moved:
            return
        lo, hi = min(s.start for s in moved), max(s.end for s in moved)
        cos = torch.ones(hi - lo, self.adapter.head_dim, dtype=torch.float32)
        sin = torch.zeros(hi - lo, self.adapter.head_dim, dtype=torch.float32)
        inv_freq = self.adapter.inv_freq
        for seg in moved:
            c, s_ = delta_cos_sin(inv_freq, seg.start - positions[seg.index])  # [D]
            cos[seg.start - lo:seg.end - lo] = c
            sin[seg.start - lo:seg.end - lo] = s_
        self._span = (lo, hi)
        self._cos, self._sin = cos.to(self.adapter.device), sin.to(self.adapter.device)  # [span, D]

    def fill(self, layer: int, kv_layer: torch.Tensor, chunks: bool = True) -> None:
        """kv_layer: [2, 1, H, N, D] (a view into the sequence buffer), written in place. ``chunks=False``
        writes only the prefix: the caller recomputes every chunk row of this layer (blend's layer 0), so
        the chunks' cached KV is not waited for."""
        if self.prefix_kv is not None:
            p = self.prefix_kv.shape[4]
            kv_layer[:, :, :, :p] = self.prefix_kv[layer]
        if not chunks or not self.segments:
            return
        if not self._rotation_ready:
            start = time.perf_counter()
            self._prepare_rotation()
            self.wait_seconds += time.perf_counter() - start
        for seg in self.segments:
            start = time.perf_counter()
            src = self.loaded[seg.index].layer(layer).to(kv_layer.device, non_blocking=True)  # [2, H, T, D]
            self.wait_seconds += time.perf_counter() - start
            kv_layer[:, 0, :, seg.start:seg.end] = src
        if self._span is not None:
            lo, hi = self._span
            k32 = kv_layer[0, 0, :, lo:hi].to(torch.float32)  # [H, span, D]
            kv_layer[0, 0, :, lo:hi] = k32 * self._cos + rotate_half(k32) * self._sin


class StaticFeed:
    """A feed over an already assembled KV [L, 2, 1, H, N, D] (used after pruning)."""

    def __init__(self, kv: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.kv = kv
        self.rows = rows  # slots to copy (None: all); other slots are computed by the caller
        self.wait_seconds = 0.0

    def fill(self, layer: int, kv_layer: torch.Tensor, chunks: bool = True) -> None:
        if self.rows is None:
            kv_layer.copy_(self.kv[layer])
        else:
            kv_layer[:, :, :, self.rows] = self.kv[layer][:, :, :, self.rows]


__all__ = ["CHUNK", "PREFIX", "QUERY", "AssembledPrompt", "LayerFeed", "Segment", "StaticFeed", "assemble"]
