"""Sample chunks for store tests: seeded, small, any dtype."""
from __future__ import annotations

import torch

from ragkv.kvstore import ChunkKV, ChunkMeta, chunk_key


def make_chunk(seed: int, tokens: int = 16, layers: int = 2, heads: int = 2, dim: int = 8,
               dtype: torch.dtype = torch.float16) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=g).to(dtype)  # kv: [L, 2, H, T, D]
    ids = tuple(int(x) for x in torch.randint(0, 1000, (tokens,), generator=g))
    return ChunkKV(kv, ChunkMeta(fingerprint="test-model", token_ids=ids, position=1, dtype=str(dtype)[6:]))


def key_of(chunk: ChunkKV, namespace: str = "t1") -> str:
    return chunk_key("test-model", namespace, chunk.meta.token_ids)
