"""Per-thread reusable scratch buffers (fresh allocations page-fault slowly) and tensor copies small enough
to stay on the calling thread."""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

_scratch = threading.local()


def scratch_numpy(name: str, nbytes: int) -> np.ndarray:
    """A per-thread reusable uint8 buffer of at least ``nbytes`` (fresh allocations page-fault slowly)."""
    buffers = _scratch.__dict__.setdefault("numpy", {})
    buf = buffers.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1), dtype=np.uint8)
        buffers[name] = buf
    return buf[:nbytes]


def scratch_int32(name: str, count: int) -> np.ndarray:
    """A per-thread reusable int32 array of ``count`` items (contents undefined)."""
    return scratch_numpy(name, 4 * count).view(np.int32)


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


__all__ = [
    "SERIAL_GRAIN",
    "as_float32",
    "copy_serial",
    "scratch_float32",
    "scratch_int32",
    "scratch_numpy",
    "write_float32",
]
