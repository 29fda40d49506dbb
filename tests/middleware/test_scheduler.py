"""The scheduler: batched decode gives one-at-a-time greedy tokens; ordering, cancellation, warm priority."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from batching import alone, together

from ragkv.middleware.batch_decode import DecodeBatch
from ragkv.middleware.compress import CompressConfig
from ragkv.middleware.context import PrepareRequest
from ragkv.middleware.errors import Overloaded
from ragkv.middleware.generation import GenerationConfig
from ragkv.middleware.scheduler import Scheduler, SchedulerConfig, _GenerateJob, pick_next
from ragkv.middleware.sliced import SlicedCall


@pytest.fixture(scope="module")
def toy_engine() -> Any:
    """The bundled toy model (trained, so greedy text varies; a random-init model repeats one token)."""
    from ragkv.integrations.models import load_model, make_adapter
    from ragkv.kvstore import TieredStore
    from ragkv.middleware.engine import ContextEngine

    return ContextEngine(make_adapter(load_model("toy")), TieredStore("host:256MB"))


def _late_stop(results: list[Any], adapter: Any) -> tuple[int, int, str]:
    """(case index, token id, word) that first appear at the third generated token or later in a result."""
    for i, result in enumerate(results):
        ids = result.token_ids
        for k in range(3, len(ids)):
            word = adapter.decode([ids[k]]).strip()
            if ids[k] not in ids[:k] and word and word not in adapter.decode(ids[:k]):
                return i, ids[k], word
    raise AssertionError("no generated token appears late for the first time")


def _cases(engine: Any) -> list[tuple[Any, Any, GenerationConfig]]:
    """Prompts of different lengths and strategies (compress: a cache shorter than its positions), different
    lengths to generate and every stop condition."""
    plain = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    docs = [f"k{i} v{(5 * i) % 64} ; the k{(i + 9) % 64} v{i} ; see" for i in range(12)]
    requests = [PrepareRequest(query=f"Q k{2 * i} ?", chunks=docs[i:2 * i + 1]) for i in range(6)]
    first = alone(engine, [(r, "full", plain) for r in requests])
    at, token, word = _late_stop(first, engine.adapter)
    return [
        (requests[0], "full", GenerationConfig(max_new_tokens=3, stop_token_ids=())),
        (requests[1], "reuse", plain),
        (requests[2], engine.strategy("compress", CompressConfig(keep_ratio=0.5)), plain),
        (requests[at], "full", GenerationConfig(max_new_tokens=12, stop_token_ids=(), stop_strings=(word,))),
        (requests[at], "full", GenerationConfig(max_new_tokens=12, stop_token_ids=(token,))),
        (requests[4], "blend", GenerationConfig(max_new_tokens=9, stop_token_ids=())),
        (requests[5], "full", GenerationConfig(max_new_tokens=1, stop_token_ids=())),
    ]


@pytest.mark.parametrize(("prefills_per_step", "prefill_slice_s"), [(1, None), (4, 0.1), (1, 0.0)])
def test_batched_decode_gives_the_tokens_of_one_at_a_time_greedy(toy_engine: Any, prefills_per_step: int,
                                                                 prefill_slice_s: float | None) -> None:
    cases = _cases(toy_engine)
    expected = alone(toy_engine, cases)
    got, scheduler = together(toy_engine, cases, prefills_per_step=prefills_per_step,
                              prefill_slice_s=prefill_slice_s)
    if prefill_slice_s == 0.0:  # a pause after every layer of every prepare made while the batch decoded
        assert scheduler.prepare_pauses >= toy_engine.adapter.num_layers
    reasons = {r.finish_reason for r in expected}
    assert reasons == {"length", "stop_string", "stop_token"}
    for want, have in zip(expected, got):
        assert (have.token_ids, have.text, have.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    # the sequences really shared decode steps (with a pause after every prepare layer, each prepare lasts
    # as many steps as the model has layers, so the short answers are over before the next joins)
    assert max(scheduler.batch_sizes) >= (2 if prefill_slice_s == 0.0 else 3)


def test_the_batch_layout_moves_the_last_slot_into_a_freed_one(host_engine: Any, make_words: Any) -> None:
    adapter = host_engine.adapter
    caches = [host_engine.prepare(PrepareRequest(query=make_words(i, 3 + 4 * i), chunks=[]), "full").cache
              for i in range(3)]
    batch = DecodeBatch(adapter, slots=1, tokens=2)  # grows on the way
    for i, cache in enumerate(caches):
        batch.add(i, cache)
    assert batch.capacity[0] >= 3 and batch.lengths == [c.get_seq_length() for c in caches]
    batch.remove(0)
    assert batch.members == [2, 1]
    n = caches[2].get_seq_length()
    assert torch.equal(batch.kv[0, 0, 0, :, :n], caches[2].layers[0].keys[0])


def _job(cached: float, submitted: float) -> _GenerateJob:
    return _GenerateJob(prepare=lambda: None, config=GenerationConfig(), cached_fraction=cached,  # type: ignore[arg-type,return-value]
                        submitted=submitted)


def test_cached_requests_go_first_and_waiting_ages_a_cold_one_ahead() -> None:
    cold, warm = _job(0.0, submitted=10.0), _job(1.0, submitted=10.5)
    assert pick_next([cold, warm], now=11.0, aging_s=2.0) is warm  # cached overtakes a slightly older cold one
    assert pick_next([cold, warm], now=14.0, aging_s=0.2) is cold  # waited long enough: aging wins
    tie = _job(0.0, submitted=10.1)
    assert pick_next([tie, cold], now=11.0, aging_s=2.0) is cold  # equal score: the earlier one


def test_a_caller_that_stops_listening_leaves_the_batch(host_engine: Any, make_words: Any) -> None:
    scheduler = Scheduler(host_engine.adapter)
    request = PrepareRequest(query=make_words(1, 4), chunks=[make_words(40, 8)])
    config = GenerationConfig(max_new_tokens=40, stop_token_ids=())

    class Stop(Exception):
        pass

    def stop_after_two(event: Any) -> None:
        if event.index >= 2:
            raise Stop

    outcome: list[Any] = []

    def keep() -> None:
        outcome.append(scheduler.generate(lambda: host_engine.prepare(request, "full"), config)[0])

    keeper = threading.Thread(target=keep)
    keeper.start()
    with pytest.raises(Stop):
        scheduler.generate(lambda: host_engine.prepare(request, "full"), config, on_token=stop_after_two)
    keeper.join(60)
    assert len(outcome[0].token_ids) == 40  # the other request ran to its end
    assert scheduler.batch_size == 0
    scheduler.close()


def test_warm_work_never_holds_up_generation(host_engine: Any, make_words: Any) -> None:
    scheduler = Scheduler(host_engine.adapter, SchedulerConfig(warm_every_steps=1))
    done_units: list[float] = []

    def unit() -> None:
        time.sleep(0.02)
        done_units.append(time.monotonic())

    warming = threading.Thread(target=scheduler.warm, args=([unit] * 100,))
    warming.start()
    while not done_units:
        time.sleep(0.005)
    request = PrepareRequest(query=make_words(2, 4), chunks=[make_words(50, 8)])
    result, _ = scheduler.generate(lambda: host_engine.prepare(request, "full"),
                                   GenerationConfig(max_new_tokens=4, stop_token_ids=()))
    finished = time.monotonic()
    assert len(result.token_ids) == 4
    assert sum(t > finished for t in done_units) + (100 - len(done_units)) > 50  # most warm work came after
    warming.join(30)
    assert len(done_units) == 100  # and all of it ran
    scheduler.close()


def test_full_queues_and_shutdown_refuse_with_overloaded(host_engine: Any, make_words: Any) -> None:
    scheduler = Scheduler(host_engine.adapter, SchedulerConfig(max_warm_waiting=1))
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=scheduler.warm, args=([lambda: (held.set(), release.wait(30))],))
    holder.start()
    assert held.wait(30)
    queued = threading.Thread(target=scheduler.warm, args=([lambda: None],))
    queued.start()
    for _ in range(300):
        if scheduler.warm_waiting == 1:
            break
        time.sleep(0.01)
    with pytest.raises(Overloaded, match="warm jobs"):
        scheduler.warm([lambda: None])
    release.set()
    holder.join(30)
    queued.join(30)
    scheduler.close()
    request = PrepareRequest(query=make_words(2, 4), chunks=[])
    with pytest.raises(Overloaded, match="shut down"):
        scheduler.generate(lambda: host_engine.prepare(request, "full"), GenerationConfig())


def test_a_sliced_prefill_pauses_after_each_layer_and_computes_the_same(toy_engine: Any) -> None:
    adapter = toy_engine.adapter
    ids = torch.tensor([toy_engine.cacher.tokens(" ".join(f"k{i % 64} v{i % 64} ;" for i in range(40)))])
    whole = adapter.prefill(ids)
    call = SlicedCall(adapter, lambda: adapter.prefill(ids), slice_s=0.0).start()
    other = DecodeBatch(adapter)
    other.add("x", adapter.make_cache(whole.kv[:, :, :, :, :10]))
    pauses = 0
    while call.wait():
        pauses += 1
        other.step([5], [10 + pauses])  # model work of another thread while paused: not a pause point
        call.resume()
    sliced = call.result()
    assert pauses == adapter.num_layers and adapter.layer_hook is None
    assert torch.equal(sliced.kv, whole.kv) and torch.equal(sliced.hidden, whole.hidden)
    failing = SlicedCall(adapter, lambda: adapter.prefill(torch.tensor([[10**9]])), slice_s=0.0).start()
    while failing.wait():
        failing.resume()
    with pytest.raises(IndexError):
        failing.result()
    assert adapter.layer_hook is None
