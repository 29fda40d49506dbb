"""``SlicedCall``: run model work on a helper thread that pauses at layer boundaries when its time slice is up.

The scheduler uses it to interleave a request's prepare with the decode steps of the running batch, so a
long prefill (a cold document, a long prompt, full prefill) does not stall every streaming user for its whole
duration: after each layer the prepare has worked ``slice_s`` or more, it pauses; the scheduler thread runs
one decode step and resumes it. Only one side runs at a time (the handshake is strict), so the engine and
the model are never used by two threads at once. The pause point is ``ModelAdapter.layer_hook``, which every
layer-by-layer path calls (prefill, selective prefill, compress); it ignores calls from other threads (the
decode step's own layers). A single layer of a very long prompt is the smallest slice.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ragkv.middleware.adapter import ModelAdapter

T = TypeVar("T")
_RUNNING, _PAUSED, _FINISHED = "running", "paused", "finished"


class SlicedCall(Generic[T]):
    """``fn()`` on its own thread, pausing after a layer once it has run ``slice_s`` since it last resumed."""

    def __init__(self, adapter: ModelAdapter, fn: Callable[[], T], slice_s: float) -> None:
        self.adapter = adapter
        self.fn = fn
        self.slice_s = slice_s
        self._cond = threading.Condition()
        self._state = _RUNNING
        self._result: Any = None
        self._error: BaseException | None = None
        self._resumed_at = 0.0
        self.pauses = 0
        self._thread = threading.Thread(target=self._main, name="ragkv-prepare", daemon=True)

    def start(self) -> SlicedCall[T]:
        if self.adapter.layer_hook is not None:
            raise RuntimeError("another sliced call is running on this adapter")
        self.adapter.layer_hook = self._layer_done
        self._resumed_at = time.perf_counter()
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self._result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the scheduler thread, which raises it
            self._error = exc
        finally:
            with self._cond:
                self._state = _FINISHED
                self._cond.notify_all()

    def _layer_done(self) -> None:
        if threading.current_thread() is not self._thread or time.perf_counter() - self._resumed_at < self.slice_s:
            return
        with self._cond:
            self._state = _PAUSED
            self.pauses += 1
            self._cond.notify_all()
            while self._state == _PAUSED:
                self._cond.wait()
        self._resumed_at = time.perf_counter()

    def wait(self) -> bool:
        """Block until the call pauses (True) or finishes (False)."""
        with self._cond:
            while self._state == _RUNNING:
                self._cond.wait()
            return self._state == _PAUSED

    def resume(self) -> None:
        with self._cond:
            self._state = _RUNNING
            self._cond.notify_all()

    def result(self) -> T:
        """The call's result (or its exception), once ``wait`` returned False; releases the adapter's hook."""
        self._thread.join()
        self.adapter.layer_hook = None
        if self._error is not None:
            raise self._error
        return self._result


__all__ = ["SlicedCall"]
