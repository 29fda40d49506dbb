"""The write-back queue of a ``TieredStore``: the latest pending value per key and one background worker.

Semantics (tested by a seeded concurrent stress test against a model of the expected state):

- last write wins per key: a pending value is replaced by a newer ``put`` and cancelled by ``put_blob`` or
  ``delete``; the worker writes a key's slower tiers under that key's lock, so no older value can land
  after a newer write or a delete of the same key;
- the worker holds only the lock of the key it writes, never one for the whole store, so writes and
  reads of other keys go on while a slow tier is written;
- a failed write (any exception) is logged, counted in ``writeback_failed`` and the entry dropped from
  the slower tiers (it stays in the fastest one); the worker keeps running, so ``flush``/``close`` return.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ragkv.kvstore.chunk import ChunkKV

log = logging.getLogger(__name__)
_STOP = object()


@dataclass(frozen=True, eq=False)
class PendingWrite:
    chunk: ChunkKV
    expires_at: float | None


class WriteBackQueue:
    """``write(key, pending)`` runs on the worker with ``key_lock(key)`` held; ``on_failure(key)`` after it raised."""

    def __init__(self, size: int, key_lock: Callable[[str], threading.RLock],
                 write: Callable[[str, PendingWrite], None], count: Callable[..., None]) -> None:
        self.pending: dict[str, PendingWrite] = {}
        self._key_lock = key_lock
        self._write = write
        self._count = count
        self._queue: queue.Queue[object] = queue.Queue(maxsize=size)
        self._worker = threading.Thread(target=self._loop, name="ragkv-write-back", daemon=True)
        self._worker.start()

    def submit(self, key: str, pending: PendingWrite) -> None:
        """Record ``pending`` as the value of ``key`` (caller holds the key lock), to be queued by ``enqueue``."""
        self.pending[key] = pending

    def enqueue(self, key: str) -> None:
        """Queue ``key`` for the worker; blocks while the queue is full (back-pressure, bounded memory)."""
        self._queue.put(key)

    def cancel(self, key: str) -> bool:
        """Forget the pending value of ``key`` (caller holds the key lock); True if there was one."""
        return self.pending.pop(key, None) is not None

    def flush(self, timeout_s: float | None = None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def stop(self) -> None:
        self.flush()
        self._queue.put(_STOP)
        self._worker.join()

    def _loop(self) -> None:
        while True:
            key = self._queue.get()
            try:
                if key is _STOP:
                    return
                assert isinstance(key, str)
                self._write_one(key)
            finally:
                self._queue.task_done()

    def _write_one(self, key: str) -> None:
        with self._key_lock(key):
            pending = self.pending.get(key)
            if pending is None:
                return  # replaced by put_blob, deleted, or already written by an earlier queue item
            try:
                self._write(key, pending)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one entry
                log.error("write-back of %s failed, dropped from the slower tiers: %s", key, exc)
                self._count(writeback_failed=1)
            if self.pending.get(key) is pending:
                del self.pending[key]


__all__ = ["PendingWrite", "WriteBackQueue"]
