"""Rotary position embedding inside the codecs: undo it on keys before a transform, redo it after decoding.

The convention is the one of every model family ragkv supports (Llama's ``rotate_half``): channel pairs
``(i, i + D/2)`` of a key at position ``p`` are rotated by ``p * inv_freq[i]``. Angles are computed in
float64 (large positions would otherwise lose phase) and applied in float32. This is the codecs' own copy of
the rotation (``ragkv.codecs`` imports nothing above it); the middleware moves cached chunks with its own.
"""
from __future__ import annotations

import numpy as np
import torch


def cos_sin(inv_freq: np.ndarray, position: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of tokens at ``position .. position + tokens - 1``: two float32 ``[T, D]`` tensors."""
    angles = (np.arange(tokens, dtype=np.float64) + float(position))[:, None] * inv_freq.astype(np.float64)[None]
    angles = np.concatenate([angles, angles], axis=1)  # [T, D]
    return torch.from_numpy(np.cos(angles).astype(np.float32)), torch.from_numpy(np.sin(angles).astype(np.float32))


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """keys: float32 ``[H, T, D]`` -> rotated by the angles whose cos/sin (``[T, D]``) are given, or back
    (``inverse``). Returns a new tensor."""
    half = keys.shape[-1] // 2
    rotated_half = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos - rotated_half * sin if inverse else keys * cos + rotated_half * sin


__all__ = ["cos_sin", "rotate"]
