"""Codec experiments of ``bench/codecs.py`` that explain a design choice rather than measure a shipped codec."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ragkv.codecs.cachegen import half_range, layer_bins
from ragkv.codecs.cachegen_stream import encode_section

AXIS_BINS = (16, 32, 64, 128, 254)


# -- delta coding experiment -----------------------------------------------------------------------------


def _quantize_tokens(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [T, C] float32 -> (symbols uint8, stored fp16 scales as float32, reconstruction)."""
    peak = np.abs(x).max(axis=1)
    s16 = peak.astype(np.float16)
    s16 = np.where(s16.astype(np.float32) < peak, np.nextafter(s16, np.float16(np.inf)), s16)
    s = s16.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, m / np.where(s > 0, s, 1), 0).astype(np.float32)
    q = np.clip(np.rint(x * inv[:, None]) + m, 0, 2 * m).astype(np.uint8)
    recon = (q.astype(np.float32) - m) * (s / m)[:, None]
    return q, s, recon


def _section_bytes(symbols: np.ndarray, nsym: int, scales: np.ndarray) -> int:
    return len(encode_section(symbols, nsym, 256, scales.astype("<f2").tobytes(), 2))


def delta_experiment(kv: torch.Tensor, anchor_every: int = 10) -> dict[str, float]:
    """Bits per element of cachegen mid level coded directly vs against anchor tokens, with the same
    bins, scales, per-channel models and streams.

    - symbol delta: the same quantized symbols, non-anchor tokens coded as the difference to their
      anchor's symbol (lossless transform: same reconstruction);
    - value delta (the paper's scheme): anchors quantized as usual, every other token's residual against
      its reconstructed anchor quantized with its own per-token scale (different error).
    """
    L = kv.shape[0]
    x_all = kv.float().permute(0, 1, 3, 2, 4).reshape(L, 2, kv.shape[3], -1).numpy()  # [L, 2, T, C]
    T = x_all.shape[2]
    anchors = np.arange(T) % anchor_every == 0
    anchor_of = (np.arange(T) // anchor_every) * anchor_every
    direct = sym_delta = val_delta = 0
    err_direct = err_val = 0.0
    for i in range(L):
        for kind in (0, 1):
            m = half_range(layer_bins(2, i, L)[kind])
            x = x_all[i, kind]
            q, s, recon = _quantize_tokens(x, m)
            direct += _section_bytes(q, 2 * m + 1, s)
            err_direct += float(np.abs(recon - x).sum())
            # symbol-domain delta against the anchor: values in 0 .. 4m
            d = (q[~anchors].astype(np.int16) - q[anchor_of[~anchors]].astype(np.int16) + 2 * m).astype(np.uint8)
            sym_delta += _section_bytes(q[anchors], 2 * m + 1, s[anchors]) + _section_bytes(d, 4 * m + 1, s[~anchors])
            # value-domain delta against the reconstructed anchor
            qa, sa, ra = _quantize_tokens(x[anchors], m)
            residual = x[~anchors] - ra[np.arange(T)[~anchors] // anchor_every]
            qr, sr, rr = _quantize_tokens(residual, m)
            val_delta += _section_bytes(qa, 2 * m + 1, sa) + _section_bytes(qr, 2 * m + 1, sr)
            err_val += float(np.abs(ra - x[anchors]).sum() + np.abs(rr - residual).sum())
    n = kv.numel()
    return {"direct_bits": 8 * direct / n, "symbol_delta_bits": 8 * sym_delta / n,
            "value_delta_bits": 8 * val_delta / n, "direct_mean_err": err_direct / n,
            "value_delta_mean_err": err_val / n}


def _normalise_channels(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=0).astype(np.float16).astype(np.float32)
    centred = x - mean
    reach = np.abs(centred).max(axis=0)
    return centred / np.where(reach > 0, reach, 1), reach


def scaling_axis_experiment(kv: torch.Tensor) -> list[list[object]]:
    """Keys coded as cachegen format 1 did (one scale per token) vs normalised per channel first (format 2),
    at several bins: rows (scheme, bins, bits per key element, relative error of the keys)."""
    L = kv.shape[0]
    keys = kv[:, 0].float().permute(0, 2, 1, 3).reshape(L, kv.shape[3], -1).numpy()  # [L, T, C]
    n, norm = keys.size, float(np.sqrt((keys.astype(np.float64) ** 2).sum()))
    rows: list[list[object]] = []
    for scheme in ("per-token scales", "per-channel normalised"):
        for bins in AXIS_BINS:
            m = half_range(bins)
            size, err2 = 0, 0.0
            for x in keys:
                if scheme == "per-token scales":
                    q, s, recon = _quantize_tokens(x, m)
                else:
                    normalised, reach = _normalise_channels(x)
                    q, s, recon = _quantize_tokens(normalised, m)
                    recon = recon * reach + (x - normalised * reach)  # undo: times reach, plus the mean
                    size += 2 * 2 * x.shape[1]  # the channel block: means and ranges in fp16
                size += _section_bytes(q, 2 * m + 1, s)
                err2 += float(((recon - x).astype(np.float64) ** 2).sum())
            rows.append([scheme, bins, 8 * size / n, float(np.sqrt(err2)) / norm])
    return rows




def entropy_model_experiment(kv: torch.Tensor, basis: Any, level: int, position: int = 0) -> dict[str, float]:
    """Bits per element of the transform codec's symbols at ``level`` under the basis' stored per-width models
    (what it ships: no table in the payload) vs the ideal adaptive model (each chunk's own histogram per
    width and layer, its cost counted as zero: a lower bound for any adaptive or stored-in-payload model)."""
    from ragkv.codecs.rotary import cos_sin, rotate
    from ragkv.codecs.transform import LEVEL_BITS, layer_plans
    from ragkv.codecs.transform_basis import symbol_radius

    L, _, H, T, D = kv.shape
    cos, sin = cos_sin(basis.inv_freq, position, T)
    stored = ideal = 0.0
    for layer in range(L):
        x = kv[layer].float().permute(0, 2, 1, 3).numpy().copy()  # [2, T, H, D]
        x[0] = rotate(x[0], cos[:, None, :], sin[:, None, :], inverse=True)
        for kind, plan in enumerate(layer_plans(basis, layer, LEVEL_BITS[level])):
            coefficients = (x[kind].reshape(T, H * D) - plan.mean) @ plan.projection
            for width, start, end in plan.widths:
                radius = symbol_radius(width)
                q = np.clip(np.rint(coefficients[:, start:end] / plan.steps[start:end]), -radius, radius)
                symbols = q.astype(np.int64).ravel() + radius
                p = basis.probabilities[width - 1]
                stored -= float(np.log2(p[symbols]).sum())
                counts = np.bincount(symbols)
                counts = counts[counts > 0]
                ideal -= float((counts * np.log2(counts / counts.sum())).sum())
    n = kv.numel()
    return {"stored_bits": stored / n, "ideal_adaptive_bits": ideal / n}


__all__ = ["delta_experiment", "entropy_model_experiment", "scaling_axis_experiment"]
