"""Reading untrusted payloads: a bounds-checked byte reader, stored scales and offsets (fp16 when they fit,
else fp32, read back finite and non-negative), and the finiteness check of what is encoded. Every check
raises ``CodecError``, so a truncated or hostile payload never reaches numpy, torch or an entropy coder with
a bad length."""
from __future__ import annotations

import struct
from typing import Any

import numpy as np
import torch

from ragkv.codecs.base import CodecError


class ByteReader:
    """Sequential, bounds-checked reads from an untrusted buffer."""

    __slots__ = ("pos", "view", "what")

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        self.pos = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self.view) - self.pos

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise CodecError(f"{self.what}: needs {n} more bytes at offset {self.pos}, has {self.remaining}")
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def array(self, dtype: np.dtype | type, count: int) -> np.ndarray:
        """``count`` little-endian items of ``dtype`` (a read-only view, no copy)."""
        dt = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self.take(count * dt.itemsize), dtype=dt)

    def done(self) -> None:
        if self.remaining:
            raise CodecError(f"{self.what}: {self.remaining} unexpected trailing bytes")


# -- scales ----------------------------------------------------------------------------------------------

SCALE_FP16 = 0
SCALE_FP32 = 1
_FP16_MAX = 65504.0


def scale_format(*tensors: torch.Tensor) -> int:
    """fp16 when every value fits it, else fp32: scales and offsets are stored in the smallest safe float."""
    for t in tensors:
        if t.numel() and float(t.abs().max()) > _FP16_MAX / 2:
            return SCALE_FP32
    return SCALE_FP16


def round_to_format(x: torch.Tensor, fmt: int, direction: int) -> torch.Tensor:
    """Round float32 ``x`` to the storage float, toward +inf (direction 1), -inf (-1) or nearest (0).

    Returns float32 holding exactly representable values of the storage format, so quantizing with
    the result and decoding with the stored value agree bit for bit.
    """
    if fmt == SCALE_FP32:
        return x.float()
    h = x.to(torch.float16)
    if direction:
        hf = h.float()
        bad = hf < x if direction > 0 else hf > x
        if bool(bad.any()):
            toward = torch.full_like(h, float("inf") if direction > 0 else float("-inf"))
            h = torch.where(bad, torch.nextafter(h, toward), h)
    return h.float()


def scale_bytes(x: torch.Tensor, fmt: int) -> bytes:
    """Exact float32 values (from ``round_to_format``) -> little-endian bytes of the storage format."""
    dt = "<f2" if fmt == SCALE_FP16 else "<f4"
    return x.numpy().astype(dt).tobytes()


def read_scales(reader: ByteReader, fmt: int, count: int, what: str, allow_negative: bool = False) -> np.ndarray:
    """Read ``count`` stored floats as float32; non-finite (or negative, for scales) values are rejected."""
    if fmt not in (SCALE_FP16, SCALE_FP32):
        raise CodecError(f"{what}: unknown scale format {fmt}")
    raw = reader.array("<f2" if fmt == SCALE_FP16 else "<f4", count)
    out = raw.astype(np.float32)
    if count and not np.isfinite(out).all():
        raise CodecError(f"{what}: non-finite stored scale or offset")
    if count and not allow_negative and (out < 0).any():
        raise CodecError(f"{what}: negative stored scale")
    return out


def check_finite(x: np.ndarray, codec: str) -> None:
    if x.size and not np.isfinite(x).all():
        raise CodecError(f"codec {codec!r} cannot encode non-finite KV values (NaN or inf)")


__all__ = [
    "SCALE_FP16",
    "SCALE_FP32",
    "ByteReader",
    "check_finite",
    "read_scales",
    "round_to_format",
    "scale_bytes",
    "scale_format",
]
