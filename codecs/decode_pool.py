"""A persistent pool of helper processes that decode (and encode) units in parallel with the caller.

constriction holds the GIL, so threads do not help; processes do, if almost nothing crosses between
them. The design keeps every per-call transfer out of pickling:

- two anonymous shared buffers (``memfd``; a deleted temporary file where memfd is missing) hold the
  payload and the decoded uint8 symbols; they only grow, so after warm-up no call page-faults;
- a pipe holds one 4-byte token per unit; the caller and every helper claim units by reading tokens
  (a read of 4 bytes from a pipe is atomic), so a core slowed by other work simply takes fewer units;
- a socket per helper carries small messages: the request, one "unit finished" note per unit (the
  caller dequantizes it while the rest decode), and "done" or an error.

Helpers are started with ``subprocess`` running a tiny bootstrap (not ``multiprocessing``), so they
never re-import the caller's ``__main__`` (an unguarded script would otherwise run again in every
helper) and never copy the caller's threads as ``fork`` would. The pool is created lazily, reused,
re-created when the worker setting changes, and shut down at interpreter exit. A helper that dies or
stops answering breaks the pool: the caller gets ``PoolBroken`` and decodes in-process instead.
"""
from __future__ import annotations

import atexit
import importlib
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

# Task functions a helper may run, by name -> "module:function". Each is called as
# fn(payload: memoryview, out: np.ndarray (uint8), spec, unit_index) and fills its part of ``out``
# and/or returns a small picklable result.
TASKS: dict[str, str] = {
    "cachegen_decode_unit": "ragkv.codecs.cachegen:decode_unit_task",
    "cachegen_encode_layer": "ragkv.codecs.cachegen:encode_layer_task",
    "transform_decode_layer": "ragkv.codecs.transform_stream:decode_unit_task",
}

HELPER_TIMEOUT_S = 120.0
START_TIMEOUT_S = 120.0
TOKEN = 4  # bytes per unit token in the queue pipe
MAX_UNITS = 8192  # tokens that fit a pipe's default 64 KiB buffer with room to spare

_BOOTSTRAP = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection({conn})\n"
    "sys.path[:] = conn.recv()\n"
    "from ragkv.codecs.decode_pool import helper_main\n"
    "helper_main(conn, {inbuf}, {outbuf}, {queue})\n"
)


class PoolBroken(RuntimeError):
    """A helper process died or stopped answering; the caller should decode in-process."""


class TaskFailed(RuntimeError):
    """A task raised in a helper; ``codec_error`` tells whether it was a CodecError (a bad payload)."""

    def __init__(self, message: str, codec_error: bool) -> None:
        super().__init__(message)
        self.codec_error = codec_error


def _resolve(name: str) -> Callable[..., Any]:
    module, _, fn = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), fn)


def _claim(queue_fd: int) -> int | None:
    """Take the next unit token from the queue pipe, or None when it is empty."""
    try:
        data = os.read(queue_fd, TOKEN)
    except BlockingIOError:
        return None
    if len(data) != TOKEN:  # cannot happen with whole tokens; treat as empty
        return None
    return int.from_bytes(data, "little")


class _Mapping:
    """A growable mapping of a shared file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.map: mmap.mmap | None = None

    def ensure(self, size: int) -> mmap.mmap:
        if self.map is None or len(self.map) < size:
            if self.map is not None:
                self.map.close()
            self.map = mmap.mmap(self.fd, max(size, 1))
        return self.map

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass  # views still exported (closing from inside a call): freed once they are released
            self.map = None


# -- helper side -----------------------------------------------------------------------------------------


def helper_main(conn: Connection, in_fd: int, out_fd: int, queue_fd: int) -> None:
    """Helper loop: per request, claim unit tokens until the queue is empty, reporting each unit."""
    from ragkv.codecs.base import CodecError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle; it shuts helpers down
    inbuf, outbuf = _Mapping(in_fd), _Mapping(out_fd)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        task, in_size, out_size, spec = msg
        in_view = out = None
        try:
            in_view = memoryview(inbuf.ensure(in_size))[:in_size]
            out = np.frombuffer(outbuf.ensure(out_size), dtype=np.uint8, count=out_size)
            fn = _resolve(task)
            while (unit := _claim(queue_fd)) is not None:
                conn.send(("unit", (unit, fn(in_view, out, spec, unit))))
            conn.send(("done", None))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, which re-raises it
            conn.send(("error", (f"{type(exc).__name__}: {exc}", isinstance(exc, CodecError))))
        finally:
            del out
            if in_view is not None:
                in_view.release()
    inbuf.close()
    outbuf.close()


def _ignore(out: np.ndarray, unit: int, result: Any) -> None:
    pass


# -- caller side -----------------------------------------------------------------------------------------


def _shared_fd(name: str) -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create(name, 0)
    with tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:  # pragma: no cover
        return os.dup(f.fileno())  # the duplicate keeps the unlinked file alive


class DecodePool:
    """``helpers`` helper processes plus the calling process share the units of one decode."""

    def __init__(self, helpers: int) -> None:
        if helpers < 1:
            raise ValueError("a pool needs at least one helper")
        self.helpers = helpers
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.broken = False
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []
        self._in_fd = _shared_fd("ragkv-decode-in")
        self._out_fd = _shared_fd("ragkv-decode-out")
        self._in_size = self._out_size = 0
        self._inbuf, self._outbuf = _Mapping(self._in_fd), _Mapping(self._out_fd)
        self._queue_r, self._queue_w = os.pipe()
        os.set_blocking(self._queue_r, False)
        try:
            for _ in range(helpers):
                ours, theirs = socket.socketpair()
                code = _BOOTSTRAP.format(conn=theirs.fileno(), inbuf=self._in_fd, outbuf=self._out_fd,
                                         queue=self._queue_r)
                proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                        pass_fds=(theirs.fileno(), self._in_fd, self._out_fd, self._queue_r))
                theirs.close()
                conn = Connection(ours.detach())
                self._procs.append(proc)
                self._conns.append(conn)
                conn.send([p for p in sys.path if isinstance(p, str)])
            for conn in self._conns:
                if not conn.poll(START_TIMEOUT_S):
                    raise PoolBroken("a decode helper did not start in time")
                conn.recv()
        except (OSError, EOFError, PoolBroken) as exc:
            self.close()
            raise PoolBroken(f"could not start decode helpers: {exc}") from exc

    def _grow(self, fd: int, current: int, size: int) -> int:
        size = max(size, 1)  # a mapping is never empty
        if size <= current:
            return current
        new = max(1 << 20, 1 << (size - 1).bit_length())
        os.ftruncate(fd, new)
        return new

    def run(self, task: str, payload: memoryview | Sequence[memoryview], out_size: int, spec: Any, nunits: int,
            local: Callable[[memoryview, np.ndarray, int], Any],
            finished: Callable[[np.ndarray, int, Any], None]) -> None:
        """Decode ``nunits`` units: helpers run ``TASKS[task]``, the caller runs ``local``; both claim
        units from the queue. ``payload`` is the bytes the units read, or the segments that laid end to end
        make them (copied once into the shared input buffer: a caller passes only what the units need).
        ``finished(out, unit, result)`` runs in the caller once per unit, in completion order, while other
        units may still be running; ``out`` is the shared uint8 output buffer and ``result`` what the task
        returned (small: it travels through the socket). Call with ``self.lock`` held.
        """
        segments = [payload] if isinstance(payload, memoryview) else list(payload)
        size = sum(len(seg) for seg in segments)
        if self.broken:
            raise PoolBroken("pool is broken")
        if nunits > MAX_UNITS:
            raise PoolBroken(f"{nunits} units exceed the queue's {MAX_UNITS}")
        self._in_size = self._grow(self._in_fd, self._in_size, size)
        self._out_size = self._grow(self._out_fd, self._out_size, out_size)
        in_view = memoryview(self._inbuf.ensure(self._in_size))[:size]
        out = np.frombuffer(self._outbuf.ensure(self._out_size), dtype=np.uint8, count=out_size)
        try:
            pos = 0
            for seg in segments:
                in_view[pos:pos + len(seg)] = seg
                pos += len(seg)
            os.write(self._queue_w, b"".join(u.to_bytes(TOKEN, "little") for u in range(nunits)))
            msg = (task, size, out_size, spec)
            try:
                for conn in self._conns:
                    conn.send(msg)
            except (OSError, ValueError) as exc:
                self._break()
                raise PoolBroken(f"decode helper unreachable: {exc}") from exc
            pending = set(range(len(self._conns)))
            failure: TaskFailed | None = None
            local_error: BaseException | None = None
            try:
                while (unit := _claim(self._queue_r)) is not None:
                    finished(out, unit, local(in_view, out, unit))
                    failure = self._drain(pending, out, finished, timeout=0.0) or failure
            except Exception as exc:  # noqa: BLE001 - re-raised once the helpers have stopped
                local_error = exc
                while _claim(self._queue_r) is not None:  # leave nothing for the helpers to take
                    pass
                finished = _ignore
            deadline = time.monotonic() + HELPER_TIMEOUT_S
            while pending:
                if time.monotonic() > deadline:
                    self._break()
                    raise PoolBroken("decode helpers stopped answering")
                failure = self._drain(pending, out, finished, timeout=0.5) or failure
            while _claim(self._queue_r) is not None:  # left over after a helper failed
                pass
            if local_error is not None:
                raise local_error
            if failure is not None:
                raise failure
        finally:
            del out
            in_view.release()

    def _drain(self, pending: set[int], out: np.ndarray, finished: Callable[[np.ndarray, int, Any], None],
               timeout: float) -> TaskFailed | None:
        """Handle every message waiting from helpers still working (waiting up to ``timeout`` for one)."""
        failure = None
        for conn in wait([self._conns[i] for i in pending], timeout=timeout):
            i = self._conns.index(conn)  # type: ignore[arg-type]
            while i in pending and conn.poll():  # type: ignore[union-attr]
                try:
                    kind, value = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError) as exc:
                    self._break()
                    raise PoolBroken(f"decode helper {i} died") from exc
                if kind == "unit":
                    finished(out, *value)
                else:
                    pending.discard(i)
                    if kind == "error":
                        failure = TaskFailed(*value)
        for i in list(pending):
            if self._procs[i].poll() is not None and not self._conns[i].poll():
                self._break()
                raise PoolBroken(f"decode helper {i} exited")
        return failure

    def _break(self) -> None:
        self.broken = True
        self.close()

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=2.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        self._inbuf.close()
        self._outbuf.close()
        for fd in (self._in_fd, self._out_fd, self._queue_r, self._queue_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._in_fd = self._out_fd = self._queue_r = self._queue_w = -1


_pool: DecodePool | None = None
_starting: threading.Thread | None = None
_failed_at = float("-inf")
_pool_lock = threading.Lock()
RETRY_AFTER_S = 60.0


def _start(helpers: int) -> None:
    global _pool, _starting, _failed_at
    try:
        pool = DecodePool(helpers)
    except PoolBroken:
        with _pool_lock:
            _failed_at = time.monotonic()
            _starting = None
        return
    with _pool_lock:
        _pool, _starting = pool, None


def get_pool(helpers: int, wait: bool = True) -> DecodePool | None:
    """The shared pool with ``helpers`` helper processes, created (or re-created) on demand.

    Starting helpers takes a second or more (each imports torch), so with ``wait=False`` a pool that
    is not ready yet is started in the background and None is returned: the caller decodes in-process
    meanwhile instead of stalling. A pool that failed to start is retried after ``RETRY_AFTER_S``.
    """
    global _pool, _starting
    with _pool_lock:
        if _pool is not None and (_pool.broken or _pool.helpers != helpers or _pool.pid != os.getpid()):
            old, _pool = _pool, None
            if old.pid == os.getpid():
                with old.lock:
                    old.close()
        if _pool is None and _starting is None and time.monotonic() - _failed_at > RETRY_AFTER_S:
            _starting = threading.Thread(target=_start, args=(helpers,), name="ragkv-decode-pool-start",
                                         daemon=True)
            _starting.start()
        pool, starting = _pool, _starting
    if pool is None and wait and starting is not None:
        starting.join()
        with _pool_lock:
            pool = _pool
    return pool


def run_if_free(pool: DecodePool | None, task: str, payload: memoryview | Sequence[memoryview], out_size: int,
                spec: Any, nunits: int, local: Callable[[memoryview, np.ndarray, int], Any],
                finished: Callable[[np.ndarray, int, Any], None]) -> bool:
    """``pool.run`` if there is a pool and no other call holds it (a busy pool is not waited for); True when it
    ran. A task's ``CodecError`` (a bad payload) is raised as one; a broken pool returns False (the caller
    works in-process and the next call starts a fresh pool)."""
    from ragkv.codecs.base import CodecError

    if pool is None or not pool.lock.acquire(blocking=False):
        return False
    try:
        pool.run(task, payload, out_size, spec, nunits, local, finished)
        return True
    except TaskFailed as exc:
        if exc.codec_error:
            raise CodecError(str(exc)) from None
        raise
    except PoolBroken:
        return False
    finally:
        pool.lock.release()


def shutdown_pool() -> None:
    """Stop the helper processes (also run at interpreter exit)."""
    global _pool
    starting = _starting
    if starting is not None:
        starting.join()
    with _pool_lock:
        if _pool is not None and _pool.pid == os.getpid():
            with _pool.lock:
                _pool.close()
        _pool = None


atexit.register(shutdown_pool)
