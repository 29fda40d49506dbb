"""Helpers shared by the codecs: optional imports, a bounds-checked payload reader, scale packing,
the decode-parallelism setting, reusable scratch buffers, and layer-parallel decoding with threads.

Nothing here knows a particular payload format; every reader check raises ``CodecError`` so that a
truncated or hostile payload never reaches numpy, torch or an entropy coder with a bad length.
"""
from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ragkv.codecs.base import (
    Codec,
    CodecError,
    check_decode_args,
    check_encode_input,
    join_layers,
)

# -- optional third-party coders -------------------------------------------------------------------------


def require_zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - installed in development
        raise CodecError("this codec needs the 'zstandard' package: pip install ragkv[codecs]") from exc
    return zstandard


def require_constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - installed in development
        raise CodecError("this codec needs the 'constriction' package: pip install ragkv[codecs]") from exc
    return constriction


# -- decode parallelism ----------------------------------------------------------------------------------

MAX_DEFAULT_WORKERS = 8
_workers: int | None = None


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def decode_workers() -> int:
    """How many cores a codec may use for one decode (the caller's own thread or process included).

    Set with ``set_decode_workers`` or the ``RAGKV_CODEC_WORKERS`` environment variable; the default
    is the number of usable cores, capped at 8.
    """
    if _workers is not None:
        return _workers
    env = os.environ.get("RAGKV_CODEC_WORKERS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise CodecError(f"RAGKV_CODEC_WORKERS must be a positive integer, got {env!r}") from None
        if value >= 1:
            return value
        raise CodecError(f"RAGKV_CODEC_WORKERS must be a positive integer, got {env!r}")
    return max(1, min(_available_cores(), MAX_DEFAULT_WORKERS))


def set_decode_workers(workers: int | None) -> None:
    """Fix the number of decoding workers (``None`` restores the default). 1 means in-process only."""
    global _workers
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise CodecError(f"decode workers must be a positive integer or None, got {workers!r}")
    _workers = workers


_thread_pool: ThreadPoolExecutor | None = None
_thread_pool_size = 0
_thread_pool_lock = threading.Lock()


def thread_map(fn: Callable[[int], Any], count: int, workers: int | None = None) -> list[Any]:
    """``[fn(i) for i in range(count)]`` on up to ``workers`` threads (for work that releases the GIL)."""
    global _thread_pool, _thread_pool_size
    workers = decode_workers() if workers is None else workers
    if workers <= 1 or count <= 1:
        return [fn(i) for i in range(count)]
    with _thread_pool_lock:
        if _thread_pool is None or _thread_pool_size != workers:
            if _thread_pool is not None:
                _thread_pool.shutdown(wait=False)
            _thread_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ragkv-codec")
            _thread_pool_size = workers
        pool = _thread_pool
    return list(pool.map(fn, range(count)))


# -- scratch buffers -------------------------------------------------------------------------------------

_scratch = threading.local()


def scratch_numpy(name: str, nbytes: int) -> np.ndarray:
    """A per-thread reusable uint8 buffer of at least ``nbytes`` (fresh allocations page-fault slowly)."""
    buffers = _scratch.__dict__.setdefault("numpy", {})
    buf = buffers.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1), dtype=np.uint8)
        buffers[name] = buf
    return buf[:nbytes]


def scratch_float32(name: str, shape: Sequence[int]) -> np.ndarray:
    """A per-thread reusable float32 array of ``shape`` (contents undefined)."""
    n = 1
    for s in shape:
        n *= s
    return scratch_numpy(name, 4 * n).view(np.float32).reshape(tuple(shape))


# -- serial tensor copies --------------------------------------------------------------------------------

# torch runs an element-wise op on the calling thread when it has fewer than 32768 elements (its
# GRAIN_SIZE); above that it wakes its intra-op pool, whose threads spin and cost far more than they
# save on a shared, loaded machine (measured here: a 131k-element copy took 23 ms instead of 0.02 ms).
# Codecs parallelise at their own level (layers, units), so their hot copies stay below the grain.
SERIAL_GRAIN = 32767


def copy_serial(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (casting as needed) in slices small enough to stay on this thread."""
    if dst.dim() == 0 or dst.numel() <= SERIAL_GRAIN:
        dst.copy_(src)
        return
    n = dst.shape[0]
    per = dst.numel() // n
    if per > SERIAL_GRAIN:
        for i in range(n):
            copy_serial(dst[i], src[i])
        return
    step = SERIAL_GRAIN // per
    for i in range(0, n, step):
        dst[i:i + step].copy_(src[i:i + step])


def as_float32(x: torch.Tensor, name: str) -> np.ndarray:
    """Any-dtype tensor -> a float32 numpy copy of it in a per-thread scratch buffer (serial copy).

    numpy has no bf16 and converts fp16 slowly, so the cast is done by torch; the result is a numpy
    array because numpy's single-threaded element-wise ops are the cheap ones on a shared machine.
    """
    out = scratch_float32(name, x.shape)
    copy_serial(torch.from_numpy(out), x)
    return out


def write_float32(dst: torch.Tensor, src: np.ndarray) -> None:
    """Cast float32 ``src`` (same shape as ``dst``, any strides) into ``dst``, serially."""
    copy_serial(dst, torch.from_numpy(src) if src.flags.writeable else torch.from_numpy(src.copy()))


# -- payload reading -------------------------------------------------------------------------------------


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


# -- layer-parallel decoding -----------------------------------------------------------------------------


class ValidatingCodec(Codec):
    """A codec whose ``decode_layers`` validates every requested layer before allocating the output.

    Subclasses implement ``plan_layer`` (parse and check one layer's bytes against the declared shape,
    returning whatever ``decode_planned`` needs) and ``decode_planned`` (fill ``out``). Layers are
    decoded on ``decode_workers()`` threads when ``threaded`` is set (for work that releases the GIL).
    """

    threaded = False

    def plan_layer(self, data: memoryview, shape: tuple[int, int, int, int], dtype: torch.dtype,
                   layer_index: int, num_layers: int) -> Any:
        raise NotImplementedError

    def decode_planned(self, plan: Any, shape: tuple[int, int, int, int], dtype: torch.dtype,
                       out: torch.Tensor) -> None:
        raise NotImplementedError

    def decode_layer(self, data, shape, dtype, layer_index, num_layers, out) -> None:
        self.decode_planned(self.plan_layer(data, shape, dtype, layer_index, num_layers), shape, dtype, out)

    def decode_layers(self, payload: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype,
                      layers: Sequence[int]) -> torch.Tensor:
        num_layers, heads, tokens, dim, layers = check_decode_args(shape, dtype, layers)
        views = self._layer_views(payload, num_layers)
        layer_shape = (2, heads, tokens, dim)
        plans = [self.plan_layer(views[i], layer_shape, dtype, i, num_layers) for i in layers]
        out = torch.empty((len(layers), 2, heads, tokens, dim), dtype=dtype)
        if self.threaded:
            thread_map(lambda j: self.decode_planned(plans[j], layer_shape, dtype, out[j]), len(layers))
        else:
            for j, plan in enumerate(plans):
                self.decode_planned(plan, layer_shape, dtype, out[j])
        return out

    def encode(self, kv: torch.Tensor) -> bytes:
        if not self.threaded:
            return super().encode(kv)
        kv = check_encode_input(kv)
        num_layers = kv.shape[0]
        return join_layers(thread_map(lambda i: self.encode_layer(kv[i], i, num_layers), num_layers))
