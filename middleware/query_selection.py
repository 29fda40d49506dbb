"""Query-aware selection (ProphetKV / SnapKV-style): rank cached tokens by the attention the query gives them.

A first, cheap pass computes only the query's rows through every layer against the cached KV (what ``reuse``
computes). At each scoring layer, the attention weights of the query rows over all keys are summed over heads
and rows, and max-pooled over a small window of neighbouring tokens (SnapKV), so that a token's score also
lifts its immediate neighbours (the rest of a name or a number). The top-scoring cached tokens are then
recomputed in a second pass through every layer, together with the query.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ragkv.middleware.adapter import repeat_kv

POOL_WINDOW = 5


def attention_mass(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, n_rep: int,
                   window: int = POOL_WINDOW) -> torch.Tensor:
    """q: [1, Hq, R, D] query rows; keys: [1, Hkv, N, D]; visible: bool [R, N] -> [N] float32 attention mass
    each key receives from the rows (softmax per row and head, summed), max-pooled over ``window`` keys."""
    k = repeat_kv(keys, n_rep).float()
    logits = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [1, Hq, R, N]
    logits = logits.masked_fill(~visible.to(logits.device)[None, None], float("-inf"))
    mass = logits.softmax(dim=-1).sum(dim=(0, 1, 2))  # [N]
    if window > 1:
        mass = F.max_pool1d(mass[None, None], window, stride=1, padding=window // 2)[0, 0]
    return mass.cpu()


def top_rows(scores: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` candidate slots with the highest scores, in ascending slot order."""
    if count <= 0 or candidates.numel() == 0:
        return candidates[:0]
    count = min(count, candidates.numel())
    best = torch.topk(scores[candidates], count).indices
    return torch.sort(candidates[best]).values


__all__ = ["POOL_WINDOW", "attention_mass", "top_rows"]
