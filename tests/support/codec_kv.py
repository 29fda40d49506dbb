"""KV for the codec suites, shaped like real KV, and transform bases fitted on it."""
from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def make_codec_kv(layers: int = 3, heads: int = 2, tokens: int = 37, dim: int = 8, dtype: torch.dtype = torch.float16,
            seed: int = 0) -> torch.Tensor:
    """KV [L, 2, H, T, D] shaped like real KV: per-channel offsets and spreads, a few outlier key channels,
    an outlier token (like an attention sink), token-to-token correlation."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(layers, 2, heads, tokens, dim, generator=g)
    smooth = torch.cumsum(torch.randn(layers, 2, heads, tokens, dim, generator=g), dim=3) * 0.1
    spread = torch.rand(layers, 2, heads, 1, dim, generator=g) * 1.5 + 0.1
    offset = torch.randn(layers, 2, heads, 1, dim, generator=g) * 0.5
    kv = (base + smooth) * spread + offset
    if dim > 2:
        kv[:, 0, :, :, 1] *= 8.0  # outlier key channel
    if tokens > 1:
        kv[:, :, :, 0] *= 4.0  # outlier first token
    return kv.to(dtype)


def rope_frequencies(dim: int) -> torch.Tensor | None:
    """A model's rotary inverse frequencies for ``head_dim`` (None for an odd one: no rotary embedding)."""
    if dim % 2:
        return None
    return 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def fit_test_basis(layers: int, heads: int, dim: int, layer_group: int = 1):
    """A basis fitted on KV like the suites' (other seeds), keys taken at positions 0 ..; sealed, not registered."""
    from ragkv.codecs.transform_fit import fit_basis

    samples = [(make_codec_kv(layers, heads, 48, dim, seed=100 + s), 0) for s in range(3)]
    return fit_basis(samples, rope_frequencies(dim), layer_group=layer_group)
