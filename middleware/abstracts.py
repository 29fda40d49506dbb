"""Chunk abstracts (LeoAM): per layer and KV head, the per-channel minimum and maximum of a chunk's keys, and
the upper bound they give on any query's attention score against the chunk, wherever the chunk is placed.

A chunk's keys are stored post-RoPE at the positions it was cached at. Placed ``delta`` positions later, every
key ``k`` becomes ``R(delta) k`` (each channel pair rotated by ``delta * inv_freq``), and a query's score is
``q · R(delta) k = (R(-delta) q) · k``. So the query is rotated back once per chunk, and its score against
every key of the chunk is at most ``sum_c max(q_c * kmin_c, q_c * kmax_c)`` (each channel's product is
largest at an end of the channel's range). The bound is exact for a one-token chunk, and never below the
true maximum (tested).

Why the query, not the abstract, is rotated: a rotation mixes the two channels of a pair, so the min/max box
of rotated keys is not the rotated box; rotating the query is exact. An abstract is ``2 * L * H * D`` floats
(SmolLM2: 30 x 3 x 64 x 2 x 4 bytes = 46 KB in float32), whatever the chunk's length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ragkv.middleware.rope import delta_cos_sin, rotate_half


@dataclass(frozen=True)
class ChunkAbstract:
    kmin: torch.Tensor  # [L, H, D] float32
    kmax: torch.Tensor  # [L, H, D] float32
    position: int  # position of the chunk's first token when its keys were computed

    @classmethod
    def from_kv(cls, kv: torch.Tensor, position: int) -> ChunkAbstract:
        """kv [L, 2, H, T, D] (keys post-RoPE, first token at ``position``), T >= 1."""
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] == 0:
            raise ValueError(f"kv must be [layers, 2, kv_heads, tokens >= 1, head_dim], got {tuple(kv.shape)}")
        keys = kv[:, 0].to(torch.float32)  # [L, H, T, D]
        return cls(keys.amin(dim=2), keys.amax(dim=2), position)

    def bound(self, layer: int, q: torch.Tensor, start: int, inv_freq: torch.Tensor) -> torch.Tensor:
        """Upper bound of ``q · k`` over the chunk's keys with its first token at ``start``.

        q: [Hq, R, D] post-RoPE queries (Hq a multiple of the abstract's KV heads; query head h reads KV head
        ``h // (Hq / H)``). Returns [Hq, R] float32."""
        kv_heads = self.kmin.shape[1]
        if q.dim() != 3 or q.shape[0] % kv_heads or q.shape[2] != self.kmin.shape[2]:
            raise ValueError(f"q must be [query_heads (a multiple of {kv_heads}), rows, {self.kmin.shape[2]}], "
                             f"got {tuple(q.shape)}")
        cos, sin = delta_cos_sin(inv_freq, self.position - start)  # rotate the query back by the shift
        q32 = q.to(torch.float32).cpu()
        q_back = q32 * cos + rotate_half(q32) * sin  # [Hq, R, D]
        rep = q.shape[0] // kv_heads
        kmin = self.kmin[layer].repeat_interleave(rep, dim=0)[:, None, :]  # [Hq, 1, D]
        kmax = self.kmax[layer].repeat_interleave(rep, dim=0)[:, None, :]
        return torch.maximum(q_back * kmin, q_back * kmax).sum(dim=-1)


__all__ = ["ChunkAbstract"]
