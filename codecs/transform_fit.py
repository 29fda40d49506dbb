"""Fitting a ``transform`` basis from calibration KV: PCA per layer group and K/V, entropy models per width.

Keys are taken with RoPE undone (their positions are given with each sample), the features of a token are
its heads side by side (``C = kv_heads * head_dim``), the mean is subtracted and the covariance's
eigenvectors become the components (largest variance first; computed in float64). The per-width entropy
models come from the calibration KV itself: every component's coefficients, divided by the component's
standard deviation, quantized at each width and histogrammed, pooled over components, layers, K and V.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ragkv.codecs.base import CodecError, check_encode_input
from ragkv.codecs.rotary import cos_sin, rotate
from ragkv.codecs.transform_basis import (
    MAX_WIDTH,
    STEP_SIGMAS,
    KindBasis,
    TransformBasis,
    normalised,
    seal,
    symbol_radius,
)

MAX_HISTOGRAM_VALUES = 1 << 22  # coefficients sampled (evenly) for the entropy models
RELATIVE_SIGMA_FLOOR = 1e-6  # components weaker than this (relative to the strongest) are left out of them


def features(kv_kind: torch.Tensor, cos_sin_table: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """One layer's keys or values ``[H, T, D]`` -> float32 features ``[T, H * D]``; keys with ``cos_sin_table``
    (``[T, D]`` each) have their rotary embedding undone first."""
    heads, tokens, dim = kv_kind.shape
    x = kv_kind.detach().to("cpu", torch.float32).permute(1, 0, 2).numpy()  # [T, H, D]
    if cos_sin_table is not None:
        x = rotate(x, cos_sin_table[0][:, None, :], cos_sin_table[1][:, None, :], inverse=True)
    return np.ascontiguousarray(x, dtype=np.float32).reshape(tokens, heads * dim)


def _check_samples(samples: Sequence[tuple[torch.Tensor, int | None]]) -> tuple[int, int, int]:
    if not samples:
        raise CodecError("fitting a transform basis needs at least one KV sample")
    shapes = {tuple(check_encode_input(kv).shape[i] for i in (0, 2, 4)) for kv, _ in samples}
    if len(shapes) != 1:
        raise CodecError(f"calibration KV samples disagree on (layers, kv_heads, head_dim): {sorted(shapes)}")
    return shapes.pop()


def fit_basis(samples: Sequence[tuple[torch.Tensor, int | None]], inv_freq: torch.Tensor | np.ndarray | None,
              layer_group: int = 1) -> tuple[TransformBasis, bytes]:
    """Fit a basis on ``samples`` (KV ``[L, 2, H, T, D]`` with the position of its first token, or None for KV
    whose keys carry no rotary embedding) -> (sealed basis, its bytes). ``inv_freq`` ([D/2]) is the model's
    rotary inverse frequencies (None: keys are coded as they are); ``layer_group`` layers share one basis."""
    num_layers, heads, dim = _check_samples(samples)
    if not isinstance(layer_group, int) or isinstance(layer_group, bool) or not 1 <= layer_group <= num_layers:
        raise CodecError(f"layer_group must be an integer in 1..{num_layers}, got {layer_group!r}")
    rope = np.zeros(0, np.float32) if inv_freq is None else np.asarray(
        inv_freq.detach().cpu() if isinstance(inv_freq, torch.Tensor) else inv_freq, dtype=np.float32).reshape(-1)
    if len(rope) not in (0, dim // 2) or (len(rope) and dim % 2):
        raise CodecError(f"{len(rope)} rotary frequencies do not fit head_dim {dim}")
    tables = [cos_sin(rope, pos, kv.shape[3]) if len(rope) and pos is not None else None for kv, pos in samples]
    groups = -(-num_layers // layer_group)
    fitted: list[tuple[KindBasis, KindBasis]] = []
    pooled: list[np.ndarray] = []  # normalised coefficients, for the entropy models
    for g in range(groups):
        layers = range(g * layer_group, min((g + 1) * layer_group, num_layers))
        kinds = []
        for kind in (0, 1):
            x = _stacked(samples, tables, layers, kind).astype(np.float64)  # [N, C], computed once per group
            kinds.append(_fit_kind(x))
            pooled.append(_normalised_coefficients(x, kinds[-1]))
        fitted.append((kinds[0], kinds[1]))
    return seal(TransformBasis(num_layers, heads, dim, layer_group, rope, fitted, _width_models(pooled)))


def _stacked(samples, tables, layers: range, kind: int) -> np.ndarray:
    return np.concatenate([features(kv[layer, kind], table if kind == 0 else None)
                           for layer in layers for (kv, _), table in zip(samples, tables, strict=True)])


def _fit_kind(x: np.ndarray) -> KindBasis:
    """Features ``[N, C]`` (float64) -> their mean and principal components, largest variance first."""
    if x.shape[0] == 0:
        raise CodecError("calibration KV holds no tokens")
    mean = x.mean(axis=0)
    centred = x - mean
    variances, vectors = np.linalg.eigh(centred.T @ centred / x.shape[0])
    variances, vectors = np.clip(variances[::-1], 0.0, None), vectors[:, ::-1]
    return KindBasis(mean.astype(np.float32), variances.astype(np.float32),
                     np.ascontiguousarray(vectors, dtype=np.float32))


def _normalised_coefficients(x: np.ndarray, basis: KindBasis) -> np.ndarray:
    """Every coefficient of ``x`` in ``basis`` divided by its component's standard deviation (flat; the
    components with next to no variance left out)."""
    sigma = np.sqrt(basis.variances.astype(np.float64))
    keep = sigma > RELATIVE_SIGMA_FLOOR * max(float(sigma.max(initial=0.0)), 1e-30)
    if not keep.any():
        return np.zeros(0)
    return ((x - basis.mean) @ basis.components[:, keep].astype(np.float64) / sigma[keep]).ravel()


def _width_models(pooled: list[np.ndarray]) -> list[np.ndarray]:
    """Per width, the pooled histogram of normalised coefficients quantized at that width."""
    pooled = [z for z in pooled if len(z)]
    values = np.concatenate(pooled) if pooled else np.zeros(1)
    if len(values) > MAX_HISTOGRAM_VALUES:
        values = values[:: -(-len(values) // MAX_HISTOGRAM_VALUES)]
    models = []
    for w in range(1, MAX_WIDTH + 1):
        radius = symbol_radius(w)
        q = np.clip(np.rint(values * ((1 << w) / STEP_SIGMAS)), -radius, radius).astype(np.int64) + radius
        models.append(normalised(np.bincount(q, minlength=2 * radius + 1) + 0.5))
    return models


__all__ = ["features", "fit_basis"]
