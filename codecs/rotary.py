"""Rotary position embedding inside the codecs: undo it on keys before a transform, redo it after decoding.

The convention is the one of every model family ragkv supports (Llama's ``rotate_half``): channel pairs
``(i, i + D/2)`` of a key at position ``p`` are rotated by ``p * inv_freq[i]``. Angles are computed in
float64 (large positions would otherwise lose phase) and applied in float32, in numpy on the calling thread.
This is the codecs' own copy of the rotation (``ragkv.codecs`` imports nothing above it); the middleware moves
cached chunks with its own.
"""
from __future__ import annotations

import functools

import numpy as np


def cos_sin(inv_freq: np.ndarray, position: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of tokens at ``position .. position + tokens - 1``: two float32 ``[T, D]`` arrays (read-only: rows
    of a cached table whose length is a power of two)."""
    rows = max(1, 1 << (tokens - 1).bit_length()) if tokens > 1 else 1
    cos, sin = _table(np.asarray(inv_freq, dtype=np.float32).tobytes(), position, rows)
    return cos[:tokens], sin[:tokens]


@functools.lru_cache(maxsize=8)  # a few (position, length) tables: chunks mostly share one
def _table(inv_freq: bytes, position: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    frequencies = np.frombuffer(inv_freq, dtype=np.float32).astype(np.float64)
    angles = (np.arange(rows, dtype=np.float64) + float(position))[:, None] * frequencies[None]
    angles = np.concatenate([angles, angles], axis=1)  # [T, D]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    cos.flags.writeable = sin.flags.writeable = False
    return cos, sin


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, inverse: bool = False) -> np.ndarray:
    """float32 ``[..., D]`` rotated by the angles whose cos/sin broadcast against it (forward, or back with
    ``inverse``); a new array."""
    half = x.shape[-1] // 2
    if inverse:
        sin = -sin
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


__all__ = ["cos_sin", "rotate"]
