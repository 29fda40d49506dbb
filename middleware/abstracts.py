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
for the L layers it covers (SmolLM2, the first 8 layers: 8 x 3 x 64 x 2 x 4 bytes = 12 KB in float32), whatever
the chunk's length.

Stored, an abstract is its own small entry beside its chunk, under ``<chunk key>.abstract`` (same namespace,
so tenants stay apart): a one-row container whose keys are the minima and values the maxima, float32, written
with the lossless ``raw`` codec (a lossy codec would break the bound; an entry some tier re-encoded lossily
reads as absent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ragkv.kvstore.chunk import ChunkKV, ChunkMeta, check_key
from ragkv.kvstore.errors import CorruptEntry
from ragkv.middleware.rope import delta_cos_sin, rotate_half

ABSTRACT_SUFFIX = ".abstract"
ABSTRACT_KIND = "abstract"
ABSTRACT_VERSION = 1


def abstract_key(chunk_key: str) -> str:
    """The key of a chunk's abstract: ``<chunk key>.abstract`` (``ConfigError`` when that is too long a key)."""
    return check_key(check_key(chunk_key) + ABSTRACT_SUFFIX)


def is_abstract_key(key: str) -> bool:
    return key.endswith(ABSTRACT_SUFFIX)


@dataclass(frozen=True)
class ChunkAbstract:
    kmin: torch.Tensor  # [L, H, D] float32
    kmax: torch.Tensor  # [L, H, D] float32
    position: int  # position of the chunk's first token when its keys were computed
    num_tokens: int  # tokens of the chunk

    @classmethod
    def from_kv(cls, kv: torch.Tensor, position: int) -> ChunkAbstract:
        """kv [L, 2, H, T, D] (keys post-RoPE, first token at ``position``), T >= 1."""
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] == 0:
            raise ValueError(f"kv must be [layers, 2, kv_heads, tokens >= 1, head_dim], got {tuple(kv.shape)}")
        keys = kv[:, 0].to(torch.float32)  # [L, H, T, D]
        return cls(keys.amin(dim=2).cpu(), keys.amax(dim=2).cpu(), position, int(kv.shape[3]))

    @property
    def num_layers(self) -> int:
        return self.kmin.shape[0]

    @property
    def nbytes(self) -> int:
        return 2 * self.kmin.numel() * self.kmin.element_size()

    def to_chunk(self, fingerprint: str) -> ChunkKV:
        """The stored form: a one-row entry, keys = minima, values = maxima, float32."""
        kv = torch.stack((self.kmin, self.kmax), dim=1)[:, :, :, None, :].contiguous()  # [L, 2, H, 1, D]
        meta = ChunkMeta(fingerprint=fingerprint, token_ids=(0,), position=self.position, dtype="float32",
                         rope=False, extra={"kind": ABSTRACT_KIND, "version": ABSTRACT_VERSION,
                                            "tokens": self.num_tokens})
        return ChunkKV(kv, meta)

    @classmethod
    def from_chunk(cls, chunk: ChunkKV) -> ChunkAbstract:
        """The inverse of ``to_chunk``; ``CorruptEntry`` for anything that is not a well-formed abstract."""
        extra, kv = chunk.meta.extra, chunk.kv
        tokens = extra.get("tokens")
        if extra.get("kind") != ABSTRACT_KIND or extra.get("version") != ABSTRACT_VERSION:
            raise CorruptEntry("not a chunk abstract of a known version")
        if type(tokens) is not int or tokens < 1 or kv.shape[3] != 1 or kv.dtype != torch.float32:
            raise CorruptEntry("a chunk abstract needs one float32 row and a positive token count")
        kmin, kmax = kv[:, 0, :, 0], kv[:, 1, :, 0]
        if not bool(torch.isfinite(kv).all()) or bool((kmin > kmax).any()):
            raise CorruptEntry("a chunk abstract's minima must be finite and not above its maxima")
        return cls(kmin.contiguous(), kmax.contiguous(), chunk.meta.position, tokens)

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

    def log_mass_bound(self, layer: int, q: torch.Tensor, start: int, inv_freq: torch.Tensor, scale: float
                       ) -> torch.Tensor:
        """Upper bound of the log of the chunk's unnormalised attention mass, ``log sum_k exp(scale * q · k)``
        <= ``log T + scale * bound``: [Hq, R] float32."""
        return self.bound(layer, q, start, inv_freq) * scale + math.log(self.num_tokens)


__all__ = ["ABSTRACT_SUFFIX", "ChunkAbstract", "abstract_key", "is_abstract_key"]
