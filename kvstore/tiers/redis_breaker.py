"""A small circuit breaker for network tiers.

A cache tier that waits on a dead server makes every request slower than a miss would. The breaker counts
consecutive backend failures; after ``failure_threshold`` of them it *opens* and the tier answers every
operation with an instant miss for a back-off period. Then it lets exactly one trial request through
(*half-open*): success closes it, failure re-opens it with a longer back-off. The back-off is a strategy
object (``ExponentialBackoff`` from ``ragkv.kvstore.policy``), so tests can use short, jitter-free delays.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"

_log = logging.getLogger(__name__)


class Backoff(Protocol):
    def delay_s(self, attempt: int) -> float: ...


class CircuitBreaker:
    """Closed -> open after N consecutive failures -> half-open after a back-off -> closed on one success.

    Thread-safe. Every ``allow()`` that returns True must be followed by exactly one of ``record_success``,
    ``record_failure`` or ``release`` (the last for an outcome that says nothing about the backend), or a
    half-open breaker would wait forever for its trial to report.
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int,
        backoff: Backoff,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.name = name
        self.failure_threshold = failure_threshold
        self._backoff = backoff
        self._clock = clock
        self._log = logger or _log
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0  # consecutive, while closed
        self._reopenings = 0  # failed trials since the breaker last closed: the back-off attempt number
        self._open_until = 0.0
        self._trial_in_flight = False
        self.times_opened = 0  # how often it went from closed to open (for stats and tests)
        self.trials = 0  # half-open trial requests let through

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """May a request go to the backend now? False = skip it and answer with a miss."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN and self._clock() >= self._open_until:
                self._state = HALF_OPEN
                self._trial_in_flight = False
            if self._state == HALF_OPEN and not self._trial_in_flight:
                self._trial_in_flight = True
                self.trials += 1
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            if self._state != CLOSED:
                self._log.info("%s reachable again; circuit closed", self.name)
            self._state = CLOSED
            self._failures = 0
            self._reopenings = 0
            self._trial_in_flight = False

    def record_failure(self, reason: BaseException | str) -> None:
        with self._lock:
            if self._state == HALF_OPEN:
                self._reopenings += 1
                self._open(reason, first=False)
                return
            if self._state == OPEN:
                return  # a request admitted before the breaker opened finished late; nothing new to learn
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(reason, first=True)

    def release(self) -> None:
        """The admitted request ended without telling us anything about the backend (e.g. a caller error)."""
        with self._lock:
            if self._state == HALF_OPEN and self._trial_in_flight:
                self._trial_in_flight = False  # let the next request be the trial instead

    def _open(self, reason: BaseException | str, first: bool) -> None:
        delay_s = self._backoff.delay_s(self._reopenings)
        self._state = OPEN
        self._trial_in_flight = False
        self._open_until = self._clock() + delay_s
        if first:
            self.times_opened += 1
            # Once per opening: a dead server must not flood the log with one line per request.
            self._log.warning(
                "%s unavailable after %d consecutive failures (%s); skipping it for %.2f s",
                self.name, self._failures, reason, delay_s,
            )
        else:
            self._log.debug("%s trial request failed (%s); skipping it for %.2f s",
                            self.name, reason, delay_s)
