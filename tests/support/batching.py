"""Run prepared requests through a ``Scheduler`` all at once, and each alone through ``generate``."""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ragkv.middleware.generation import GenerationConfig, GenerationResult
from ragkv.middleware.scheduler import Scheduler, SchedulerConfig


def alone(engine: Any, cases: Sequence[tuple[Any, str, GenerationConfig]]) -> list[GenerationResult]:
    """Each case (prepare request, strategy, config) decoded by itself with the model's own forward."""
    return [engine.generate(request, config, strategy=strategy) for request, strategy, config in cases]


def together(engine: Any, cases: Sequence[tuple[Any, str, GenerationConfig]], **config: Any
             ) -> tuple[list[GenerationResult], Scheduler]:
    """Every case submitted at once to one scheduler (the worker is held until all are queued, so they share
    decode steps). Returns the results in case order and the (closed) scheduler, for its step counts."""
    scheduler = Scheduler(engine.adapter, SchedulerConfig(**config))
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=scheduler.warm, args=([lambda: (held.set(), release.wait(30))],))
    holder.start()
    assert held.wait(30)
    results: list[Any] = [None] * len(cases)

    def submit(i: int) -> None:
        request, strategy, generation = cases[i]
        results[i] = scheduler.generate(lambda: engine.prepare(request, strategy), generation)[0]

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for _ in range(3000):
        if scheduler.waiting == len(cases):
            break
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join(120)
    holder.join(30)
    scheduler.close()
    return results, scheduler
