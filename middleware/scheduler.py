"""``Scheduler``: one worker thread owns the model; requests join a running decode batch (continuous batching).

Callers (request threads) submit a generate job — a ``prepare`` function (prefix / reuse / blend / compress,
store fetches included) plus its ``GenerationConfig`` — and block on their own event queue, which relays tokens
as they come. The worker loop, between two decode steps:

1. admits up to ``prefills_per_step`` waiting jobs (all of them up to ``max_batch`` while nothing decodes):
   runs the job's prepare, samples its first token and adds its cache to the ``DecodeBatch``. While a batch
   decodes, the prepare runs on a helper thread in slices of ``prefill_slice_s`` (``SlicedCall``): at a layer
   boundary it pauses for one decode step, so a long prefill is chunked and streams keep flowing;
2. runs one batched forward over every active sequence; finished sequences leave at once;
3. runs one unit of warm work when no generate job is waiting — at once when nothing decodes, else once every
   ``warm_every_steps`` steps — so a corpus warm never stops generation and never turns it into an error.

Which waiting job goes next is cache-aware: the score is the fraction of its prompt already cached plus the
seconds it has waited divided by ``aging_s``, so a cached request overtakes a cold one that arrived just
before it, and a cold one overtakes anything fresher once it has waited ``aging_s`` (nothing starves).

A full queue raises ``Overloaded`` (HTTP 429 with Retry-After); so does a job not started within
``wait_timeout_s``. A caller that stops listening (its token callback raised) cancels its job: it leaves the
batch at the next step. Sampling, stop strings and streaming are per request (``SequenceDecoder``).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.batch_decode import DecodeBatch
from ragkv.middleware.context import PreparedContext
from ragkv.middleware.errors import Overloaded
from ragkv.middleware.generation import (
    GenerationConfig,
    GenerationResult,
    SequenceDecoder,
    TokenEvent,
    result_of,
)
from ragkv.middleware.sliced import SlicedCall

T = TypeVar("T")
POLL_S = 0.05  # how often a waiting caller checks its start deadline


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # sequences decoded together
    max_waiting: int = 16  # generate jobs queued before Overloaded
    max_warm_waiting: int = 64  # warm jobs queued before Overloaded
    prefills_per_step: int = 1  # prepares admitted between two decode steps while a batch decodes
    # while a batch decodes, a prepare pauses for one decode step each time it has run this long (at a layer
    # boundary); None: a prepare runs whole
    prefill_slice_s: float | None = 0.25
    warm_every_steps: int = 4  # while decoding, one warm unit per this many steps (and only with no job waiting)
    aging_s: float = 2.0  # waiting this long outweighs a fully cached prompt
    wait_timeout_s: float = 120.0  # a job not started by then is refused with Overloaded


@dataclass(eq=False)
class _Finished:
    result: GenerationResult
    prepared: PreparedContext


@dataclass(eq=False)
class _GenerateJob:
    prepare: Callable[[], PreparedContext]
    config: GenerationConfig
    cached_fraction: float
    submitted: float
    events: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    started: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    decoder: SequenceDecoder | None = None
    prepared: PreparedContext | None = None

    def score(self, now: float, aging_s: float) -> float:
        return self.cached_fraction + (now - self.submitted) / aging_s


@dataclass(eq=False)
class _WarmJob:
    units: deque[Callable[[], Any]]
    results: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def pick_next(jobs: Sequence[_GenerateJob], now: float, aging_s: float) -> _GenerateJob:
    """The waiting job with the highest score (cached fraction + waited / aging_s); the earliest on a tie."""
    return max(jobs, key=lambda j: (j.score(now, aging_s), -j.submitted))


class Scheduler:
    """Owns all model work of one adapter. ``generate`` and ``warm`` block their caller; ``close`` stops."""

    def __init__(self, adapter: ModelAdapter, config: SchedulerConfig = SchedulerConfig()) -> None:
        self.adapter = adapter
        self.config = config
        self._cond = threading.Condition()
        self._pending: list[_GenerateJob] = []
        self._warm: deque[_WarmJob] = deque()
        self._batch = DecodeBatch(adapter)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.batch_sizes: Counter[int] = Counter()  # decode steps by batch size
        self.prepare_pauses = 0  # decode steps run inside a sliced prepare

    # -- callers --------------------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ragkv-scheduler", daemon=True)
            self._thread.start()

    def _enqueue(self, waiting: list[Any] | deque[Any], job: Any, limit: int, what: str) -> None:
        """Queue ``job`` for the worker; ``Overloaded`` when shut down or ``limit`` jobs already wait there."""
        with self._cond:
            if self._closed:
                raise Overloaded("the scheduler is shut down")
            if len(waiting) >= limit:
                raise Overloaded(f"{len(waiting)} {what} are already waiting; retry later")
            waiting.append(job)
            self._start_worker()
            self._cond.notify()

    def generate(self, prepare: Callable[[], PreparedContext], config: GenerationConfig, *,
                 cached_fraction: float = 0.0, on_token: Callable[[TokenEvent], None] | None = None
                 ) -> tuple[GenerationResult, PreparedContext]:
        """Queue a request, relay its tokens to ``on_token`` (in this thread) and return its result. Raises what
        ``prepare`` raised, ``Overloaded`` when the queue is full or the job did not start in time; an exception
        from ``on_token`` cancels the job and propagates."""
        job = _GenerateJob(prepare, config, cached_fraction, time.monotonic())
        self._enqueue(self._pending, job, self.config.max_waiting, "model requests")
        try:
            return self._relay(job, on_token)
        except BaseException:
            job.cancelled.set()
            with self._cond:
                if job in self._pending:
                    self._pending.remove(job)
            raise

    def _relay(self, job: _GenerateJob, on_token: Callable[[TokenEvent], None] | None
               ) -> tuple[GenerationResult, PreparedContext]:
        deadline = job.submitted + self.config.wait_timeout_s
        while True:
            try:
                item = job.events.get(timeout=None if job.started.is_set() else POLL_S)
            except queue.Empty:
                if not job.started.is_set() and time.monotonic() > deadline:
                    raise Overloaded(f"the model stayed busy for {self.config.wait_timeout_s:.0f} s; retry later"
                                     ) from None
                continue
            if isinstance(item, TokenEvent):
                if on_token is not None:
                    on_token(item)
            elif isinstance(item, _Finished):
                return item.result, item.prepared
            else:
                raise item

    def warm(self, units: Sequence[Callable[[], T]]) -> list[T]:
        """Run ``units`` (each a short piece of model work) at low priority; their results in order."""
        job = _WarmJob(deque(units))
        if not job.units:
            return []
        self._enqueue(self._warm, job, self.config.max_warm_waiting, "warm jobs")
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.results

    @property
    def waiting(self) -> int:
        """Generate jobs queued and not yet started."""
        return len(self._pending)

    @property
    def warm_waiting(self) -> int:
        return len(self._warm)

    @property
    def batch_size(self) -> int:
        return len(self._batch)

    def close(self) -> None:
        """Stop the worker; queued and running jobs get ``Overloaded``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # -- worker ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        steps_since_warm = 0
        while True:
            with self._cond:
                while not (self._pending or self._warm or len(self._batch)) and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self._fail_all(Overloaded("the scheduler is shut down"))
                    return
            admitted = 0
            while len(self._batch) < self.config.max_batch and (admitted < self.config.prefills_per_step
                                                                 or not len(self._batch)):
                job = self._take_next()
                if job is None:
                    break
                self._admit(job)
                admitted += 1
            self._drop_cancelled()
            if len(self._batch):
                self._decode_step()
                steps_since_warm += 1
            if self._warm and not self._pending and (not len(self._batch)
                                                     or steps_since_warm >= self.config.warm_every_steps):
                self._warm_unit()
                steps_since_warm = 0

    def _take_next(self) -> _GenerateJob | None:
        with self._cond:
            self._pending[:] = [j for j in self._pending if not j.cancelled.is_set()]  # in place: _enqueue holds it
            if not self._pending:
                return None
            job = pick_next(self._pending, time.monotonic(), self.config.aging_s)
            self._pending.remove(job)
            job.started_at = time.monotonic()
            job.started.set()
            return job

    def _prepare(self, job: _GenerateJob) -> PreparedContext:
        """The job's prepare; while a batch decodes, sliced, with a decode step in each pause."""
        if self.config.prefill_slice_s is None or not len(self._batch):
            return job.prepare()
        call = SlicedCall(self.adapter, job.prepare, self.config.prefill_slice_s).start()
        while call.wait():
            self._drop_cancelled()
            if len(self._batch):
                self._decode_step()
                self.prepare_pauses += 1
            call.resume()
        return call.result()

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._batch.members if j.cancelled.is_set()]:
            self._batch.remove(job)

    def _admit(self, job: _GenerateJob) -> None:
        try:
            prepared = self._prepare(job)
        except Exception as exc:  # noqa: BLE001 - relayed: the caller raises it
            job.events.put(exc)
            return
        prepare_s = float(prepared.timings.get("total", 0.0))
        decoder = SequenceDecoder(self.adapter, prepared, job.config, time.perf_counter() - prepare_s)
        job.prepared, job.decoder = prepared, decoder
        try:
            self._deliver(job, decoder.step(prepared.logits))
            if not decoder.done:
                self._batch.add(job, prepared.cache)
                prepared.cache = None  # its KV now lives in the batch: do not hold it twice
        except Exception as exc:  # noqa: BLE001 - relayed: the caller raises it
            job.events.put(exc)
            return
        if decoder.done:
            self._finish(job)

    def _decode_step(self) -> None:
        members: list[_GenerateJob] = list(self._batch.members)
        decoders = [j.decoder for j in members]
        try:
            logits = self._batch.step([d.token for d in decoders], [d.position for d in decoders])  # type: ignore[union-attr]
            self.steps += 1
            self.batch_sizes[len(members)] += 1
            for job, row in zip(members, logits):
                decoder = job.decoder
                decoder.advanced()  # type: ignore[union-attr]
                self._deliver(job, decoder.step(row))  # type: ignore[union-attr]
                if decoder.done:  # type: ignore[union-attr]
                    self._batch.remove(job)
                    self._finish(job)
        except Exception as exc:  # noqa: BLE001 - a failed step fails every sequence in it; the batch starts over
            for job in self._batch.members:
                job.events.put(exc)
            self._batch.clear()

    def _deliver(self, job: _GenerateJob, events: list[TokenEvent]) -> None:
        for event in events:
            job.events.put(event)

    def _finish(self, job: _GenerateJob) -> None:
        decoder, prepared = job.decoder, job.prepared
        assert decoder is not None and prepared is not None
        result = result_of(decoder, prepared, float(prepared.timings.get("total", 0.0)),
                           time.perf_counter() - decoder.t0)
        result.queue_s = job.started_at - job.submitted
        job.events.put(_Finished(result, prepared))

    def _warm_unit(self) -> None:
        with self._cond:
            job = self._warm[0]
            unit = job.units.popleft()
            if not job.units:
                self._warm.popleft()
        try:
            job.results.append(unit())
        except Exception as exc:  # noqa: BLE001 - relayed: the warm caller raises it
            job.error = exc
            with self._cond:
                if job in self._warm:
                    self._warm.remove(job)
        if job.error is not None or not job.units:
            job.done.set()

    def _fail_all(self, error: BaseException) -> None:
        for job in [*self._pending, *self._batch.members]:
            job.events.put(error)
        for warm in self._warm:
            warm.error = error
            warm.done.set()
        self._pending.clear()
        self._warm.clear()
        self._batch.clear()


__all__ = ["Scheduler", "SchedulerConfig", "pick_next"]
