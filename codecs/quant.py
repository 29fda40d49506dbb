"""The ``quant`` codec: asymmetric int8 or packed int4 quantization as in KIVI, optionally zstd after.

KIVI's observation: keys have a few outlier channels, so keys are quantized per channel (one scale
and offset per (head, channel) over a group of ``key_group`` tokens); values have no such channels
and are quantized per token (one scale and offset per (head, token) over the head dimension).
Scales and offsets are stored as fp16 (fp32 for a layer whose magnitudes do not fit fp16), rounded
so that no element is clipped: the reconstruction error is at most half a quantization step.

Layer body (little-endian): u8 version, u8 bits, u8 scale format, u8 reserved, u16 key_group,
key scales [H, G, D], key offsets [H, G, D], value scales [H, T], value offsets [H, T], key codes
[H, T, D], value codes [H, T, D] (int4: two codes per byte, low nibble first, zero-padded).
With ``zstd_level`` > 0 the layer is one zstd frame of that body.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from ragkv.codecs.base import CodecError, CodecParams, register_codec
from ragkv.codecs.buffers import as_float32, scratch_float32, write_float32
from ragkv.codecs.layered import ValidatingCodec
from ragkv.codecs.optional_deps import require_zstd
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
from ragkv.codecs.zstd import MAX_LEVEL, zstd_compress, zstd_decompress_exact

FORMAT_VERSION = 1
_HEADER = struct.Struct("<BBBBH")


@dataclass(frozen=True)
class QuantParams(CodecParams):
    bits: int = 8
    key_group: int = 64
    zstd_level: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise CodecError(f"quant bits must be 4 or 8, got {self.bits!r}")
        if not isinstance(self.key_group, int) or isinstance(self.key_group, bool) or not 1 <= self.key_group <= 65535:
            raise CodecError(f"quant key_group must be an integer in 1..65535, got {self.key_group!r}")
        if not isinstance(self.zstd_level, int) or isinstance(self.zstd_level, bool) or not 0 <= self.zstd_level <= MAX_LEVEL:
            raise CodecError(f"quant zstd_level must be 0 (off) or 1..{MAX_LEVEL}, got {self.zstd_level!r}")


def _code_bytes(n: int, bits: int) -> int:
    return n if bits == 8 else (n + 1) // 2


def _body_size(shape: tuple[int, int, int, int], bits: int, key_group: int, fmt: int) -> int:
    _, heads, tokens, dim = shape
    groups = -(-tokens // key_group)
    fbytes = 2 if fmt == SCALE_FP16 else 4
    n = heads * tokens * dim
    return _HEADER.size + fbytes * (2 * heads * groups * dim + 2 * heads * tokens) + 2 * _code_bytes(n, bits)


def _pack(codes: np.ndarray, bits: int) -> bytes:
    """uint8 codes (any shape) -> bytes; int4 packs two per byte, low nibble first."""
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.tobytes()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_into(data: np.ndarray, n: int, bits: int, dst: np.ndarray) -> None:
    """Stored codes (uint8 bytes) -> ``dst`` (contiguous float32 [n])."""
    if bits == 8:
        dst[:] = data
        return
    half = n // 2
    pairs = dst[: 2 * half].reshape(half, 2)
    np.bitwise_and(data[:half], 0x0F, out=pairs[:, 0], casting="unsafe")
    np.right_shift(data[:half], 4, out=pairs[:, 1], casting="unsafe")
    if n % 2:
        dst[-1] = data[half] & 0x0F


@register_codec
class QuantCodec(ValidatingCodec):
    name = "quant"
    params_class = QuantParams
    lossless = False
    threaded = True

    params: QuantParams

    # -- encode ------------------------------------------------------------------------------------------
    def encode_layer(self, layer: torch.Tensor, layer_index: int, num_layers: int) -> bytes:
        bits, kg = self.params.bits, self.params.key_group
        levels = (1 << bits) - 1
        x = as_float32(layer, "quant_x")  # [2, H, T, D]
        check_finite(x, self.name)
        _, heads, tokens, dim = x.shape
        keys, values = x[0], x[1]
        groups = -(-tokens // kg)
        if tokens:
            pad = groups * kg - tokens
            kp = np.pad(keys, ((0, 0), (0, pad), (0, 0)), mode="edge") if pad else keys
            kp = kp.reshape(heads, groups, kg, dim)
            k_min, k_max = kp.min(axis=2), kp.max(axis=2)  # [H, G, D]
            v_min, v_max = values.min(axis=2), values.max(axis=2)  # [H, T]
        else:
            k_min = k_max = np.zeros((heads, 0, dim), np.float32)
            v_min = v_max = np.zeros((heads, 0), np.float32)
        k_off, k_scale, v_off, v_scale, fmt = _ranges_to_stored(k_min, k_max, v_min, v_max, levels)
        if tokens:
            k_codes = _quantize(keys.reshape(heads, tokens, dim),
                                np.repeat(k_off, kg, axis=1)[:, :tokens], np.repeat(k_scale, kg, axis=1)[:, :tokens],
                                levels)
            v_codes = _quantize(values, v_off[:, :, None], v_scale[:, :, None], levels)
        else:
            k_codes = v_codes = np.zeros((heads, 0, dim), np.uint8)
        body = b"".join([
            _HEADER.pack(FORMAT_VERSION, bits, fmt, 0, kg),
            _stored(k_scale, fmt), _stored(k_off, fmt), _stored(v_scale, fmt), _stored(v_off, fmt),
            _pack(k_codes, bits), _pack(v_codes, bits),
        ])
        if self.params.zstd_level:
            return zstd_compress(body, self.params.zstd_level)
        return body

    # -- decode ------------------------------------------------------------------------------------------
    def plan_layer(self, data, shape, dtype, layer_index, num_layers):
        what = f"quant layer {layer_index}"
        sizes = {_body_size(shape, self.params.bits, self.params.key_group, f) for f in (SCALE_FP16, SCALE_FP32)}
        if self.params.zstd_level:
            zstandard = require_zstd()
            try:
                declared = zstandard.frame_content_size(data)
            except zstandard.ZstdError as exc:
                raise CodecError(f"{what}: not a zstd frame ({exc})") from exc
            if declared not in sizes:
                raise CodecError(f"{what}: zstd frame declares {declared} bytes, the shape implies one of {sorted(sizes)}")
            return data, declared, layer_index, True
        if len(data) not in sizes:
            raise CodecError(f"{what}: {len(data)} bytes, the shape implies one of {sorted(sizes)}")
        return data, len(data), layer_index, False

    def decode_planned(self, plan, shape, dtype, out) -> None:
        data, size, layer_index, compressed = plan
        what = f"quant layer {layer_index}"
        if compressed:
            data = zstd_decompress_exact(data, size, what)
        reader = ByteReader(data, what)
        version, bits, fmt, _, kg = reader.unpack(_HEADER.format)
        if version != FORMAT_VERSION or bits != self.params.bits or kg != self.params.key_group:
            raise CodecError(f"{what}: header (version {version}, bits {bits}, key_group {kg}) does not match "
                             f"the codec parameters {self.params}")
        if fmt not in (SCALE_FP16, SCALE_FP32) or _body_size(shape, bits, kg, fmt) != size:
            raise CodecError(f"{what}: scale format {fmt} does not match the layer size")
        _, heads, tokens, dim = shape
        groups = -(-tokens // kg)
        levels = (1 << bits) - 1
        k_scale = read_scales(reader, fmt, heads * groups * dim, what)
        k_off = read_scales(reader, fmt, heads * groups * dim, what, allow_negative=True)
        v_scale = read_scales(reader, fmt, heads * tokens, what)
        v_off = read_scales(reader, fmt, heads * tokens, what, allow_negative=True)
        n = heads * tokens * dim
        k_codes = reader.array(np.uint8, _code_bytes(n, bits))
        v_codes = reader.array(np.uint8, _code_bytes(n, bits))
        reader.done()
        limit = torch.finfo(dtype).max  # the encoder's ranges are those of values of this dtype
        for scale, off in ((k_scale, k_off), (v_scale, v_off)):
            if scale.size and float((np.abs(off.astype(np.float64)) + scale.astype(np.float64) * levels).max()) > limit:
                raise CodecError(f"{what}: stored scales and offsets exceed the range of {dtype}")
        if n == 0:
            return
        # keys: codes into a token-padded float32 buffer [H, G*kg, D] so the per-group scale broadcasts
        kbuf = scratch_float32("quant_k", (heads, groups * kg, dim))
        if groups * kg == tokens:
            _unpack_into(k_codes, n, bits, kbuf.reshape(-1))
        else:
            tmp = scratch_float32("quant_tmp", (n,))
            _unpack_into(k_codes, n, bits, tmp)
            kbuf[:, :tokens] = tmp.reshape(heads, tokens, dim)
            kbuf[:, tokens:] = 0  # padding: keep uninitialised scratch out of the arithmetic
        kg4 = kbuf.reshape(heads, groups, kg, dim)
        np.multiply(kg4, k_scale.reshape(heads, groups, 1, dim), out=kg4)
        np.add(kg4, k_off.reshape(heads, groups, 1, dim), out=kg4)
        write_float32(out[0], kbuf[:, :tokens])
        # values: per (head, token) scale and offset
        vbuf = scratch_float32("quant_v", (heads, tokens, dim))
        _unpack_into(v_codes, n, bits, vbuf.reshape(-1))
        np.multiply(vbuf, v_scale.reshape(heads, tokens, 1), out=vbuf)
        np.add(vbuf, v_off.reshape(heads, tokens, 1), out=vbuf)
        write_float32(out[1], vbuf)


def _ranges_to_stored(k_min: np.ndarray, k_max: np.ndarray, v_min: np.ndarray, v_max: np.ndarray,
                      levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Group minima and maxima -> stored offsets (rounded down) and scales (rounded up) as exact float32,
    in fp16 when everything fits it, so that no element is clipped."""
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (k_min, k_max, v_min, v_max)]
    fmt = scale_format(*t)
    while True:
        k_off = round_to_format(t[0], fmt, -1)
        v_off = round_to_format(t[2], fmt, -1)
        k_scale = round_to_format((t[1] - k_off) / levels, fmt, 1)
        v_scale = round_to_format((t[3] - v_off) / levels, fmt, 1)
        finite = all(bool(torch.isfinite(a).all()) for a in (k_off, v_off, k_scale, v_scale))
        if finite or fmt == SCALE_FP32:
            break
        fmt = SCALE_FP32  # a range that overflows fp16 even though its ends fit
    return k_off.numpy(), k_scale.numpy(), v_off.numpy(), v_scale.numpy(), fmt


def _stored(values: np.ndarray, fmt: int) -> bytes:
    return scale_bytes(torch.from_numpy(np.ascontiguousarray(values)), fmt)


def _quantize(x: np.ndarray, offset: np.ndarray, scale: np.ndarray, levels: int) -> np.ndarray:
    """float32 x -> uint8 codes in 0..levels; a zero scale (constant group) maps to code 0."""
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.subtract(x, offset)
    np.divide(q, safe, out=q)
    np.rint(q, out=q)
    q = np.where(scale > 0, q, np.float32(0))
    np.clip(q, 0, levels, out=q)
    return q.astype(np.uint8)
