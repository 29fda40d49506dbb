"""The ``cachegen`` codec: CacheGen-style per-token quantization and ANS coding with constriction.

Quantization (per layer, keys and values apart, each viewed as ``[T, C]`` with C = heads * head_dim):
keys are first normalised per channel, as KIVI quantizes them: ``k' = (k - mu_c) / r_c`` with the channel's
mean ``mu_c`` over the chunk's tokens and its largest deviation ``r_c`` from it (both stored, fp16 when they
fit; ``r_c`` rounded up). Then one scale per token ``s_t = max_c |x[t, c]|`` (stored as fp16 rounded up, or
fp32 for a layer whose magnitudes do not fit fp16), ``M = bins // 2 - 1``, symbol ``q = round(x * M / s_t) + M``
in ``0 .. 2M``, decoded as ``(q - M) * s_t / M`` (keys: times ``r_c``, plus ``mu_c``). The error is at most half
a step, ``s_t / (2M)`` (keys: times ``r_c``).

Why keys are normalised (measured on SmolLM2-135M's real KV, see ``bench/RESULTS.md``): a few key channels are
tens of times larger than the rest, so a per-token scale set by them leaves the other channels a handful of
symbols: relative error 0.24 at 16 bins and 0.11 at 32, and below the level needed to keep answers even at
the 255 symbols a uint8 allows. Normalised, the same bins give a quarter of the error (0.058 / 0.027). Per-
channel entropy coding had already made the per-token scheme's rate low, so at equal bits the two are close;
normalising is what lets the levels reach low errors at all.

Bins per layer (``layer_bins``): CacheGen's public table for 32-layer models, with the layer groups
scaled to the model's depth (shallow layers get more bins: their errors propagate through the whole
network). Key groups end at 10/32 and 20/32 of the depth, value groups at 2/32 (rounded up, so a
24-layer model gets key groups 0-7, 8-14, 15-23 and value groups 0-1, 2-23):

    level 1: keys 16 / 16 / 12, values 16 / 12   (smallest)
    level 2: keys 32 / 16 / 16, values 32 / 16   (the middle level, the default)
    level 3: keys 32 / 32 / 32, values 32 / 32   (best quality)

Symbols are entropy coded per (K/V, layer, channel) distribution in independent blocks of at most
256 tokens (see ``cachegen_stream``). Decoding shares the (layer, K/V) sections between the calling
process and ``decode_workers() - 1`` helper processes (see ``decode_pool``), encoding shares the
layers the same way; with one worker, for small payloads, or while the helpers are still starting,
everything runs in-process. The bytes never depend on how the work was shared.

Layer payload: a header ``<BBBBH>`` (format version, scale format, key bins, value bins,
block tokens), the keys' channel means ``[C]`` and ranges ``[C]`` (in the scale format), then the keys'
section and the values' section.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ragkv.codecs.base import (
    DTYPE_NAMES,
    DTYPES,
    Codec,
    CodecError,
    CodecParams,
    check_decode_args,
    register_codec,
)
from ragkv.codecs.buffers import as_float32, scratch_float32, scratch_numpy, write_float32
from ragkv.codecs.cachegen_stream import (
    MAX_BLOCK_TOKENS,
    SectionPlan,
    decode_section,
    encode_section,
    parse_section,
    section_end,
)
from ragkv.codecs.decode_pool import get_pool, run_if_free
from ragkv.codecs.optional_deps import require_constriction
from ragkv.codecs.parallel import decode_workers
from ragkv.codecs.payload import (
    SCALE_FP16,
    SCALE_FP32,
    ByteReader,
    check_finite,
    read_scales,
    round_to_format,
    scale_bytes,
    scale_format,
)

FORMAT_VERSION = 2
_HEADER = struct.Struct("<BBBBH")

# level -> (key bins for the shallow / middle / deep group, value bins for the shallow / other group)
LEVEL_BINS: dict[int, tuple[tuple[int, int, int], tuple[int, int]]] = {
    1: ((16, 16, 12), (16, 12)),
    2: ((32, 16, 16), (32, 16)),
    3: ((32, 32, 32), (32, 32)),
}
MIDDLE_LEVEL = 2
# group boundaries as fractions of the depth (CacheGen's public code: layers 10 and 20 of 32 for keys,
# layer 2 of 32 for values)
KEY_GROUP_ENDS = ((10, 32), (20, 32))
VALUE_GROUP_END = (2, 32)

# below this many symbols a decode stays in-process: the round trip to helpers costs more than it saves
POOL_MIN_SYMBOLS = 1 << 17


def _ceil_frac(num_layers: int, frac: tuple[int, int]) -> int:
    return -(-num_layers * frac[0] // frac[1])


def layer_bins(level: int, layer: int, num_layers: int) -> tuple[int, int]:
    """(key bins, value bins) for ``layer`` of a ``num_layers``-deep model at ``level``."""
    if level not in LEVEL_BINS:
        raise CodecError(f"cachegen level must be one of {sorted(LEVEL_BINS)}, got {level!r}")
    key_bins, value_bins = LEVEL_BINS[level]
    k1, k2 = (_ceil_frac(num_layers, f) for f in KEY_GROUP_ENDS)
    v1 = _ceil_frac(num_layers, VALUE_GROUP_END)
    k = key_bins[0] if layer < k1 else key_bins[1] if layer < k2 else key_bins[2]
    v = value_bins[0] if layer < v1 else value_bins[1]
    return k, v


def half_range(bins: int) -> int:
    """M: symbols run over 0 .. 2M for ``bins`` bins."""
    return bins // 2 - 1


@dataclass(frozen=True)
class CacheGenParams(CodecParams):
    level: int = MIDDLE_LEVEL
    block_tokens: int = MAX_BLOCK_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or self.level not in LEVEL_BINS:
            raise CodecError(f"cachegen level must be one of {sorted(LEVEL_BINS)}, got {self.level!r}")
        if (not isinstance(self.block_tokens, int) or isinstance(self.block_tokens, bool)
                or not 1 <= self.block_tokens <= MAX_BLOCK_TOKENS):
            raise CodecError(f"cachegen block_tokens must be an integer in 1..{MAX_BLOCK_TOKENS}, "
                             f"got {self.block_tokens!r}")


def _normalise_keys(keys: np.ndarray, fmt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys ``[T, C]`` float32 -> normalised in place to ``(k - mean_c) / reach_c``; returns (mean, reach) as
    float32 tensors exactly representable in ``fmt`` (reach rounded up, so normalised keys stay within 1)."""
    tokens, channels = keys.shape
    if not tokens:
        zeros = torch.zeros(channels)
        return zeros, zeros
    mean = round_to_format(torch.from_numpy(keys.mean(axis=0)), fmt, 0)
    keys -= mean.numpy()
    reach = round_to_format(torch.from_numpy(np.abs(keys).max(axis=0)), fmt, 1)
    with np.errstate(divide="ignore"):
        inverse = np.where(reach.numpy() > 0, np.float32(1) / reach.numpy(), np.float32(0)).astype(np.float32)
    keys *= inverse
    return mean, reach


class _Unit(NamedTuple):
    """One (layer, K/V) section to decode: where it is, where its symbols go, how to dequantize."""

    plan: SectionPlan
    out_offset: int
    half_range: int


class _LayerPlan(NamedTuple):
    units: tuple[_Unit, _Unit]
    scales: tuple[np.ndarray, np.ndarray]
    key_channels: tuple[np.ndarray, np.ndarray]  # the keys' channel means and ranges, float32 [C]
    sides: tuple[np.ndarray, np.ndarray]  # decompressed side information (kept by the caller only)


def decode_unit_task(payload: memoryview, out: np.ndarray, spec: Sequence[_Unit], unit: int,
                     side: np.ndarray | None = None) -> None:
    """Decode one unit's symbols into the shared buffer (run by helpers and by the caller alike)."""
    u = spec[unit]
    size = u.plan.tokens * u.plan.channels
    decode_section(payload, u.plan, out[u.out_offset:u.out_offset + size].reshape(u.plan.tokens, u.plan.channels),
                   f"cachegen unit {unit}", side)


_helper_codecs: dict[str, CacheGenCodec] = {}


def encode_layer_task(payload: memoryview, out: np.ndarray, spec: tuple, layer: int) -> bytes:
    """Encode one layer of the KV in the shared buffer (run by helpers; the caller encodes directly)."""
    params, shape, dtype_name = spec
    key = repr(sorted(params.items()))
    codec = _helper_codecs.get(key)
    if codec is None:
        codec = _helper_codecs[key] = CacheGenCodec(CacheGenParams(**params))
    kv = torch.frombuffer(payload, dtype=DTYPES[dtype_name]).view(shape)
    return codec.encode_layer(kv[layer], layer, shape[0])


@register_codec
class CacheGenCodec(Codec):
    name = "cachegen"
    params_class = CacheGenParams
    lossless = False

    params: CacheGenParams

    def __init__(self, params: CodecParams | None = None) -> None:
        super().__init__(params)
        require_constriction()

    def bins(self, layer: int, num_layers: int) -> tuple[int, int]:
        return layer_bins(self.params.level, layer, num_layers)

    # -- encode ------------------------------------------------------------------------------------------
    def encode_layer(self, layer: torch.Tensor, layer_index: int, num_layers: int) -> bytes:
        # layer: [2, H, T, D] -> x: [2, T, C] float32 (C = H * D, channel = head * D + d)
        _, heads, tokens, dim = layer.shape
        channels = heads * dim
        bins = self.bins(layer_index, num_layers)
        x = as_float32(layer.permute(0, 2, 1, 3), "cachegen_x").reshape(2, tokens, channels)
        check_finite(x, self.name)
        fmt = scale_format(torch.from_numpy(x.reshape(-1)))
        mean, reach = _normalise_keys(x[0], fmt)  # x[0] now holds the normalised keys
        peak = np.abs(x).max(axis=2) if tokens and channels else np.zeros((2, tokens), np.float32)  # [2, T]
        peak_t = torch.from_numpy(peak)
        scales = round_to_format(peak_t, fmt, 1)
        if fmt == SCALE_FP16 and bool(torch.isinf(scales).any()):
            fmt, scales = SCALE_FP32, peak_t
        parts = [_HEADER.pack(FORMAT_VERSION, fmt, bins[0], bins[1], self.params.block_tokens),
                 scale_bytes(mean, fmt), scale_bytes(reach, fmt)]
        for kind in (0, 1):
            m = half_range(bins[kind])
            s = scales[kind].numpy()
            with np.errstate(divide="ignore"):
                inv = np.where(s > 0, np.float32(m) / s, np.float32(0)).astype(np.float32)
            q = np.multiply(x[kind], inv[:, None])
            np.rint(q, out=q)
            q += m
            np.clip(q, 0, 2 * m, out=q)
            parts.append(encode_section(q.astype(np.uint8), 2 * m + 1, self.params.block_tokens,
                                        scale_bytes(scales[kind], fmt), 2 if fmt == SCALE_FP16 else 4))
        return b"".join(parts)

    def encode(self, kv: torch.Tensor, position: int | None = None) -> bytes:
        """kv [L, 2, H, T, D] -> payload; layers are encoded by the caller and the pool's helpers
        together when ``decode_workers() > 1`` (the bytes are the same either way). ``position`` is unused."""
        workers = decode_workers()
        if (workers <= 1 or kv.dim() != 5 or kv.shape[0] < 2 or kv.dtype not in DTYPE_NAMES
                or kv.numel() < POOL_MIN_SYMBOLS):
            return super().encode(kv)
        pool = get_pool(workers - 1, wait=False)
        if pool is None:
            return super().encode(kv)
        kv = kv.detach().to("cpu").contiguous()
        num_layers = kv.shape[0]
        raw = memoryview(kv.view(-1).view(torch.uint8).numpy())
        spec = (self.params.to_dict(), tuple(kv.shape), DTYPE_NAMES[kv.dtype])
        parts: list[bytes] = [b""] * num_layers

        def finished(_: np.ndarray, layer: int, data: bytes) -> None:
            parts[layer] = data

        if not run_if_free(pool, "cachegen_encode_layer", raw, 0, spec, num_layers,
                           lambda buf, out, layer: self.encode_layer(kv[layer], layer, num_layers), finished):
            return super().encode(kv)  # the pool is busy with another call, or broke: encode here
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        return b"".join([struct.pack(f"<{num_layers + 1}Q", *offsets), *parts])

    # -- decode ------------------------------------------------------------------------------------------
    def _plan_layer(self, view: memoryview, start: int, end: int, layer_index: int, num_layers: int,
                    heads: int, tokens: int, dim: int, out_offset: int, dtype: torch.dtype) -> _LayerPlan:
        what = f"cachegen layer {layer_index}"
        limit = torch.finfo(dtype).max  # the encoder's scales are magnitudes of values of this dtype
        if end - start < _HEADER.size:
            raise CodecError(f"{what}: {end - start} bytes, shorter than its header")
        version, fmt, key_bins, value_bins, block = _HEADER.unpack_from(view, start)
        if version != FORMAT_VERSION:
            raise CodecError(f"{what}: format version {version}, expected {FORMAT_VERSION}")
        if (key_bins, value_bins) != self.bins(layer_index, num_layers) or block != self.params.block_tokens:
            raise CodecError(f"{what}: bins {key_bins}/{value_bins} and block {block} do not match the codec "
                             f"parameters {self.params} for a {num_layers}-layer model")
        if fmt not in (SCALE_FP16, SCALE_FP32):
            raise CodecError(f"{what}: unknown scale format {fmt}")
        channels = heads * dim
        itemsize = 2 if fmt == SCALE_FP16 else 4
        channel_end = start + _HEADER.size + 2 * channels * itemsize
        if channel_end > end:
            raise CodecError(f"{what}: shorter than its key channel block")
        reader = ByteReader(view[start + _HEADER.size:channel_end], f"{what} key channels")
        mean = read_scales(reader, fmt, channels, f"{what} key means", allow_negative=True)
        reach = read_scales(reader, fmt, channels, f"{what} key ranges")
        if channels and float(max(np.abs(mean).max(), reach.max())) > limit:
            raise CodecError(f"{what}: a stored key mean or range exceeds the range of {dtype}")
        pos = channel_end
        units, scales, sides = [], [], []
        for kind, bins in enumerate((key_bins, value_bins)):
            m = half_range(bins)
            plan, s, side = parse_section(view, pos, end, tokens, channels, 2 * m + 1, block, fmt,
                                          f"{what} {'keys' if kind == 0 else 'values'}")
            if tokens and float(s.max()) > limit:
                raise CodecError(f"{what}: a stored token scale exceeds the range of {dtype}")
            units.append(_Unit(plan, out_offset + kind * tokens * channels, m))
            scales.append(s)
            sides.append(side)
            pos = section_end(plan)
        if pos != end:
            raise CodecError(f"{what}: {end - pos} unexpected trailing bytes")
        return _LayerPlan((units[0], units[1]), (scales[0], scales[1]), (mean, reach), (sides[0], sides[1]))

    def decode_layer(self, data, shape, dtype, layer_index, num_layers, out) -> None:
        _, heads, tokens, dim = shape
        view = memoryview(data).cast("B")
        lp = self._plan_layer(view, 0, len(view), layer_index, num_layers, heads, tokens, dim, 0, dtype)
        symbols = scratch_numpy("cachegen_symbols", 2 * tokens * heads * dim)
        for kind in (0, 1):
            decode_unit_task(view, symbols, lp.units, kind, lp.sides[kind])
            _dequantize(symbols, lp.units[kind], lp.scales[kind], heads, dim, out[kind],
                        lp.key_channels if kind == 0 else None)

    def decode_layers(self, payload: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype,
                      layers: Sequence[int]) -> torch.Tensor:
        num_layers, heads, tokens, dim, layers = check_decode_args(shape, dtype, layers)
        view = memoryview(payload).cast("B")
        self._layer_views(view, num_layers)  # validates the layer table
        table = struct.unpack_from(f"<{num_layers + 1}Q", view, 0)
        base = 8 * (num_layers + 1)
        per_unit = tokens * heads * dim
        plans = [self._plan_layer(view, base + table[i], base + table[i + 1], i, num_layers, heads, tokens, dim,
                                  2 * j * per_unit, dtype) for j, i in enumerate(layers)]
        # every requested layer is validated: only now allocate what the declared shape implies
        out = torch.empty((len(layers), 2, heads, tokens, dim), dtype=dtype)
        units = [u for lp in plans for u in lp.units]
        scales = [s for lp in plans for s in lp.scales]
        channel_norms = [lp.key_channels if kind == 0 else None for lp in plans for kind in (0, 1)]
        sides = [s for lp in plans for s in lp.sides]

        def finished(symbols: np.ndarray, unit: int, result: object = None) -> None:
            _dequantize(symbols, units[unit], scales[unit], heads, dim, out[unit // 2, unit % 2], channel_norms[unit])

        workers = decode_workers()
        total = len(units) * per_unit
        pool = None
        if workers > 1 and total >= POOL_MIN_SYMBOLS and len(units) > 1:
            pool = get_pool(workers - 1, wait=False)
        if pool is not None:
            # the helpers get only the requested layers' bytes, laid end to end (not the whole payload per
            # call: a layer-by-layer load would otherwise copy it once per layer); a busy pool is not waited for
            segments, pooled = _requested_layers(view, base, table, layers, units)
            if run_if_free(pool, "cachegen_decode_unit", segments, total, pooled, len(pooled),
                           lambda buf, symbols, unit: decode_unit_task(buf, symbols, pooled, unit, sides[unit]),
                           finished):
                return out
        symbols = scratch_numpy("cachegen_symbols", total)
        for unit in range(len(units)):
            decode_unit_task(view, symbols, units, unit, sides[unit])
            finished(symbols, unit)
        return out


def _requested_layers(view: memoryview, base: int, table: Sequence[int], layers: Sequence[int],
                      units: Sequence[_Unit]) -> tuple[list[memoryview], list[_Unit]]:
    """The requested layers' bytes as segments laid end to end, and the units re-based onto that layout."""
    segments: list[memoryview] = []
    rebased: list[_Unit] = []
    pos = 0
    for j, layer in enumerate(layers):
        start, end = base + table[layer], base + table[layer + 1]
        shift = pos - start
        segments.append(view[start:end])
        for unit in units[2 * j:2 * j + 2]:
            plan = unit.plan._replace(side_off=unit.plan.side_off + shift, lengths_off=unit.plan.lengths_off + shift,
                                      words_off=unit.plan.words_off + shift)
            rebased.append(unit._replace(plan=plan))
        pos += end - start
    return segments, rebased


def _dequantize(symbols: np.ndarray, unit: _Unit, scales: np.ndarray, heads: int, dim: int,
                out: torch.Tensor, channel_norm: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """uint8 symbols of one unit -> ``out`` [H, T, D]: (q - M) * s_t / M (keys: * r_c + mu_c), in float32,
    on this thread."""
    tokens, channels = unit.plan.tokens, unit.plan.channels
    if tokens == 0 or channels == 0:
        return
    q = symbols[unit.out_offset:unit.out_offset + tokens * channels].reshape(tokens, channels)
    f = scratch_float32("cachegen_dequant", (tokens, channels))
    m = unit.half_range
    np.subtract(q, np.float32(m), out=f, dtype=np.float32)
    np.multiply(f, (scales / np.float32(m))[:, None], out=f)
    if channel_norm is not None:
        mean, reach = channel_norm
        np.multiply(f, reach[None, :], out=f)
        np.add(f, mean[None, :], out=f)
    write_float32(out, f.reshape(tokens, heads, dim).transpose(1, 0, 2))


def start_decode_pool(wait: bool = True) -> bool:
    """Start the decode helpers now (each takes a second or more to import torch) rather than in the
    background on the first large decode; returns whether a pool is ready. No-op with one worker."""
    workers = decode_workers()
    if workers <= 1:
        return False
    return get_pool(workers - 1, wait=wait) is not None


def level_summary(num_layers: int) -> dict[int, dict[str, list[int]]]:
    """Per level, the key and value bins of every layer (for documentation and the benchmark)."""
    return {level: {"key_bins": [layer_bins(level, i, num_layers)[0] for i in range(num_layers)],
                    "value_bins": [layer_bins(level, i, num_layers)[1] for i in range(num_layers)]}
            for level in sorted(LEVEL_BINS)}


__all__ = ["LEVEL_BINS", "CacheGenCodec", "CacheGenParams", "layer_bins", "level_summary", "start_decode_pool"]
