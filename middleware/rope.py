"""Rotary position embedding helpers and the key re-rotation that moves a cached chunk to a new position.

RoPE rotates each channel pair ``(i, i + D/2)`` of a key at position ``p`` by the angle ``p * inv_freq[i]``.
Rotations compose, so a key computed at ``p`` moves to ``p + delta`` by a rotation of ``delta * inv_freq``:
``k' = k * cos(delta * theta) + rotate_half(k) * sin(delta * theta)``. ``delta`` is the same for every token
of a chunk, so cos/sin are one ``[D]`` vector per chunk. The math runs in float32 (angles in float64, where
a large ``delta`` would otherwise lose phase) and the result is cast back to the cache dtype.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [..., D]``: ``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin: [B, T, D] (already in x's dtype, as the model's rotary module returns them)."""
    cos = cos.unsqueeze(1)  # [B, 1, T, D]
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def delta_cos_sin(inv_freq: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotation by ``delta`` positions: two float32 ``[D]`` vectors (angles computed in float64)."""
    angles = float(delta) * inv_freq.detach().to("cpu", torch.float64)  # [D/2]
    angles = torch.cat((angles, angles))  # [D]
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def rotate_key_tensor(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """keys: [..., T, D] post-RoPE -> the same keys as if computed ``delta`` positions later (same dtype)."""
    if delta == 0:
        return keys
    cos, sin = delta_cos_sin(inv_freq, delta)
    cos, sin = cos.to(keys.device), sin.to(keys.device)
    k32 = keys.to(torch.float32)
    return (k32 * cos + rotate_half(k32) * sin).to(keys.dtype)


def rotate_keys(kv: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """kv: [L, 2, H, T, D] -> a new tensor whose keys (index 0) are rotated by ``delta`` positions.

    Values carry no position and are copied unchanged. ``inv_freq`` ([D/2]) is the model's rotary inverse
    frequencies (``ModelAdapter.inv_freq``); ``ModelAdapter.rotate_keys(kv, delta)`` binds it.
    """
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"kv must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(kv.shape)}")
    if kv.shape[-1] != 2 * inv_freq.shape[-1]:
        raise ValueError(f"head_dim {kv.shape[-1]} does not match {inv_freq.shape[-1]} rotary frequencies")
    out = kv.clone()
    if delta != 0:
        out[:, 0] = rotate_key_tensor(kv[:, 0], delta, inv_freq)
    return out


__all__ = ["apply_rope", "delta_cos_sin", "rotate_half", "rotate_key_tensor", "rotate_keys"]
