"""The ``zstd`` codec: each layer's bytes through Zstandard, optionally byte-shuffled first.

Byte shuffling stores all first bytes of the layer's elements, then all second bytes, and so on;
the exponent bytes of fp16/bf16 KV are far more repetitive than the mantissa bytes, so zstd finds
more to compress (measured 1.18x vs 1.09x plain on fp16 KV). Lossless. Each layer is one zstd frame
that records its content size; a frame whose declared size is not the layer's size is rejected before
anything is decompressed, so a hostile payload cannot make zstd allocate more than the shape implies.
zstd releases the GIL, so layers are compressed and decompressed on ``decode_workers()`` threads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ragkv.codecs.base import CodecError, CodecParams, register_codec
from ragkv.codecs.layered import ValidatingCodec
from ragkv.codecs.optional_deps import require_zstd

MIN_LEVEL = 1
MAX_LEVEL = 19


@dataclass(frozen=True)
class ZstdParams(CodecParams):
    level: int = 3
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.level, int) or isinstance(self.level, bool) or not MIN_LEVEL <= self.level <= MAX_LEVEL:
            raise CodecError(f"zstd level must be an integer in {MIN_LEVEL}..{MAX_LEVEL}, got {self.level!r}")
        if not isinstance(self.shuffle, bool):
            raise CodecError(f"zstd shuffle must be true or false, got {self.shuffle!r}")


_UINT = {2: np.uint16, 4: np.uint32}


def shuffle_bytes(flat: np.ndarray, itemsize: int) -> np.ndarray:
    """uint8 [n * itemsize] -> uint8 [itemsize * n]: byte j of every element together, plane by plane.

    Done with shifts on whole words (a byte-strided transpose is several times slower).
    """
    words = flat.view(_UINT[itemsize])
    n = words.size
    planes = np.empty(itemsize * n, dtype=np.uint8)
    tmp = np.empty(n, dtype=words.dtype) if itemsize > 2 else None
    for j in range(itemsize):
        src = words if j == 0 else np.right_shift(words, 8 * j, out=tmp) if tmp is not None else words >> 8
        np.copyto(planes[j * n:(j + 1) * n], src, casting="unsafe")
    return planes


def unshuffle_into(planes: np.ndarray, itemsize: int, out_flat: np.ndarray) -> None:
    """Inverse of ``shuffle_bytes``, written into ``out_flat`` (uint8 [n * itemsize])."""
    words = out_flat.view(_UINT[itemsize])
    n = words.size
    np.copyto(words, planes[:n], casting="unsafe")
    tmp = np.empty(n, dtype=words.dtype)
    for j in range(1, itemsize):
        np.copyto(tmp, planes[j * n:(j + 1) * n], casting="unsafe")
        np.left_shift(tmp, 8 * j, out=tmp)
        np.bitwise_or(words, tmp, out=words)


def zstd_decompress_exact(data: memoryview | bytes, expected: int, what: str) -> bytes:
    """Decompress one zstd frame that must hold exactly ``expected`` bytes, with nothing after it."""
    zstandard = require_zstd()
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: not a zstd frame ({exc})") from exc
    if declared != expected:
        raise CodecError(f"{what}: zstd frame declares {declared} bytes, the shape implies {expected}")
    obj = zstandard.ZstdDecompressor().decompressobj()
    try:
        raw = obj.decompress(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: corrupt zstd frame ({exc})") from exc
    if not obj.eof or obj.unused_data or len(raw) != expected:
        raise CodecError(f"{what}: zstd frame is truncated or followed by trailing bytes")
    return raw


def zstd_compress(data: bytes | memoryview, level: int) -> bytes:
    zstandard = require_zstd()
    # ZstdCompressor objects are not safe to share between threads: build one per call (cheap).
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


@register_codec
class ZstdCodec(ValidatingCodec):
    name = "zstd"
    params_class = ZstdParams
    lossless = True
    threaded = True

    params: ZstdParams

    def encode_layer(self, layer: torch.Tensor, layer_index: int, num_layers: int) -> bytes:
        # layer: [2, H, T, D] -> its bytes (shuffled into byte planes if asked)
        flat = layer.contiguous().view(-1).view(torch.uint8).numpy()
        if self.params.shuffle and layer.element_size() > 1:
            flat = shuffle_bytes(flat, layer.element_size())
        return zstd_compress(flat, self.params.level)

    def plan_layer(self, data, shape, dtype, layer_index, num_layers):
        zstandard = require_zstd()
        expected = 2 * shape[1] * shape[2] * shape[3] * torch.empty((), dtype=dtype).element_size()
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd layer {layer_index}: not a zstd frame ({exc})") from exc
        if declared != expected:
            raise CodecError(f"zstd layer {layer_index}: frame declares {declared} bytes, the shape implies {expected}")
        return data, expected, layer_index

    def decode_planned(self, plan, shape, dtype, out) -> None:
        data, expected, layer_index = plan
        if expected == 0:
            zstd_decompress_exact(data, 0, f"zstd layer {layer_index}")
            return
        raw = np.frombuffer(zstd_decompress_exact(data, expected, f"zstd layer {layer_index}"), dtype=np.uint8)
        out_flat = out.view(-1).view(torch.uint8).numpy()
        itemsize = out.element_size()
        if self.params.shuffle and itemsize > 1:
            unshuffle_into(raw, itemsize, out_flat)
        else:
            out_flat[:] = raw
