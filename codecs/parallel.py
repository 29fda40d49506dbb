"""How many cores a decode may use (``set_decode_workers``, ``RAGKV_CODEC_WORKERS``), and a shared thread pool
for codec work that releases the GIL."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ragkv.codecs.base import CodecError

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


__all__ = [
    "MAX_DEFAULT_WORKERS",
    "decode_workers",
    "set_decode_workers",
    "thread_map",
]
