"""Stored per-token importance: scored once when a chunk is prefilled, kept in its container, read at query time.

The score of a token is the attention it receives inside its own chunk: at every layer, the softmax weights
that the chunk's rows give it, summed over heads and rows and divided by the number of rows that can see it
(causal: the later a token, the fewer rows look at it), summed over layers (H2O's heavy hitters, averaged
per observer). Scores are scaled to 0-255 per chunk (``ChunkMeta.importance``), so a selection rule can pick
each chunk's most attended tokens without computing anything at query time (``BlendConfig(rule="stored")``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ragkv.kvstore.chunk import MAX_IMPORTANCE
from ragkv.middleware.adapter import ModelAdapter, exact_causal_mask


class ReceivedAttention:
    """Accumulates, over layers, the attention each key receives from the valid rows of a right-padded batch
    (``lengths[b]`` valid rows per batch row, the start token at slot 0 included)."""

    def __init__(self, adapter: ModelAdapter, lengths: Sequence[int], width: int) -> None:
        self.adapter = adapter
        self.lengths = list(lengths)
        slots = torch.arange(width)
        self.mask = exact_causal_mask(slots, slots)
        self.total = torch.zeros(len(self.lengths), width)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """q [B, Hq, W, D], k [B, H, W, D] of one layer (one batch row at a time: bounded memory)."""
        for b, n in enumerate(self.lengths):
            probs = self.adapter.attention_probs(layer, q[b:b + 1, :, :n], k[b:b + 1, :, :n], self.mask[:n, :n])
            self.total[b, :n] += probs.sum(dim=(0, 1, 2)).cpu()

    def scores(self, b: int) -> tuple[int, ...]:
        """Batch row ``b``'s tokens after the start token, scaled to 0-255."""
        n = self.lengths[b]
        observers = torch.arange(n - 1, 0, -1, dtype=torch.float32)  # key j (1..n-1) is seen by rows j..n-1
        return quantize(self.total[b, 1:n] / observers)


def quantize(scores: torch.Tensor) -> tuple[int, ...]:
    top = float(scores.max()) if scores.numel() else 0.0
    if top <= 0:
        return tuple([0] * scores.numel())
    return tuple(int(x) for x in (scores / top * MAX_IMPORTANCE).round().clamp(0, MAX_IMPORTANCE).tolist())


def top_by_importance(scores: Sequence[int], length: int, count: int) -> list[int]:
    """Offsets of a chunk's ``count`` most important tokens, ascending. A chunk stored without scores (an
    older entry, or one uploaded without them) gives its first tokens, where the attention sink sits."""
    count = max(0, min(count, length))
    if not count:
        return []
    if len(scores) != length:
        return list(range(count))
    best = torch.topk(torch.tensor(scores, dtype=torch.float32), count).indices
    return sorted(int(i) for i in best)


__all__ = ["ReceivedAttention", "quantize", "top_by_importance"]
