"""The redis tier when things go wrong: dead, hung and absent servers, and corrupted values.

The contract: the caller never sees an exception from the backend. Reads miss, writes are dropped and
counted, and the circuit breaker keeps an outage from costing a timeout per request.
"""
from __future__ import annotations

import gc
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from redis_servers import RedisClusterServers, RedisServer, free_port, raw_redis_client, require_binaries

from ragkv.kvstore import ChunkKV, ChunkMeta
from ragkv.kvstore.policy import ConstantBackoff, ExponentialBackoff
from ragkv.kvstore.tiers.redis_breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from ragkv.kvstore.tiers.redis_tier import RedisTier

OPEN_OP_BOUND_S = 0.05  # an operation skipped by an open breaker must be about as fast as a local miss
FAST_BREAKER = {"breaker_failures": 2, "breaker_backoff_base_s": 0.1, "breaker_backoff_cap_s": 0.2,
                "socket_timeout_s": 0.25, "connect_timeout_s": 0.25}


def sample_chunk(seed: int, tokens: int = 16) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 2, 2, tokens, 8, generator=g).to(torch.float16)  # kv: [L, 2, H, T, D]
    ids = tuple(int(x) for x in torch.randint(0, 50_000, (tokens,), generator=g))
    return ChunkKV(kv, ChunkMeta(fingerprint="redis-fault-test", token_ids=ids))


# -- the breaker alone, on a fake clock --------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("test", failure_threshold=3, backoff=ExponentialBackoff(1.0, 4.0, jitter=False),
                             clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure("boom")
    assert breaker.allow()
    breaker.record_success()  # a success in between resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure("boom")
    assert breaker.state == OPEN and breaker.times_opened == 1
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow() and breaker.state == HALF_OPEN  # the one trial
    assert not breaker.allow()  # everyone else still skips while it runs
    breaker.record_failure("still down")
    assert breaker.state == OPEN and breaker.times_opened == 1  # a failed trial is not a new opening
    clock.now += 1.5
    assert not breaker.allow()  # the back-off doubled: 2 s now
    clock.now += 0.5
    assert breaker.allow()
    breaker.release()  # the trial ended without news (a caller error): the next request may probe
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.allow()


def test_breaker_backoff_is_capped() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("test", 1, ExponentialBackoff(1.0, 2.0, jitter=False), clock=clock)
    breaker.allow()
    breaker.record_failure("x")
    for _ in range(5):  # failed trials: 2 s, then capped at 2 s
        clock.now += 2.0
        assert breaker.allow()
        breaker.record_failure("x")
    clock.now += 2.0
    assert breaker.allow()


def test_breaker_logs_one_warning_per_opening(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("test tier", 1, ConstantBackoff(1.0), clock=clock)
    with caplog.at_level(logging.DEBUG, logger="ragkv.kvstore.tiers.redis_breaker"):
        for _ in range(2):  # two openings, each followed by failed trials
            breaker.allow()
            breaker.record_failure("down")
            for _ in range(3):
                clock.now += 1.0
                assert breaker.allow()
                breaker.record_failure("down")
            clock.now += 1.0
            assert breaker.allow()
            breaker.record_success()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 == breaker.times_opened
    assert "test tier unavailable" in warnings[0].getMessage()


# -- a real server dying, hanging, or never there -------------------------------------------------------
def test_killed_server_is_a_miss_then_the_tier_reconnects(
    fresh_redis_server: RedisServer, make_redis_tier: Callable[..., RedisTier],
) -> None:
    server = fresh_redis_server
    tier = make_redis_tier(server.url, **FAST_BREAKER)
    chunk = sample_chunk(1)
    tier.put("ns:before", chunk)
    assert tier.get("ns:before") is not None

    server.kill()
    ops: list[Callable[[], Any]] = [
        lambda: tier.get("ns:before"),
        lambda: tier.put("ns:during", chunk),
        lambda: tier.contains("ns:before"),
        lambda: list(tier.keys("ns")),
        lambda: tier.delete("ns:x"),
        lambda: tier.get_many(["ns:before", "ns:during"]),
        lambda: tier.put_many([("ns:m", chunk)]),
    ]
    expected = [None, None, False, [], False, [None, None], None]
    exceptions: list[BaseException] = []
    wrong: list[tuple[int, Any]] = []
    open_op_times: list[float] = []
    rounds = 0
    with gc_paused():
        deadline = time.monotonic() + 0.6  # long enough for several back-offs and failed trials
        while time.monotonic() < deadline or rounds < 20:
            for i, op in enumerate(ops):
                was_open, trials = tier.breaker.state == OPEN, tier.breaker.trials
                start = time.perf_counter()
                try:
                    result = op()
                except Exception as exc:  # noqa: BLE001 - the property under test: nothing reaches the caller
                    exceptions.append(exc)
                    continue
                elapsed = time.perf_counter() - start
                if was_open and tier.breaker.trials == trials:  # skipped by the open circuit, not a trial
                    open_op_times.append(elapsed)
                if result != expected[i]:
                    wrong.append((i, result))
            rounds += 1
            time.sleep(0.005)
    assert exceptions == [] and wrong == []
    assert tier.breaker.times_opened >= 1 and len(open_op_times) > 20
    assert max(open_op_times) < OPEN_OP_BOUND_S
    stats = tier.stats.snapshot()
    assert stats["hits"] == 1 and stats["misses"] >= 3 * rounds  # get + two from get_many, every round
    assert stats["errors"] >= 2 * rounds and stats["puts"] == 1  # every put was dropped and counted

    server.restart()  # same port, empty (no persistence)
    recovered_in = _wait_until_serving(tier, chunk)
    assert recovered_in < 2.0 and tier.breaker.state == CLOSED
    assert tier.get("ns:before") is None  # the restarted server lost it: a miss, not an error
    got = tier.get("ns:after")
    assert got is not None and got.equals(chunk)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Latency bounds measure the tier, not a full garbage collection of a test process holding torch."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _wait_until_serving(tier: RedisTier, chunk: ChunkKV, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        tier.put("ns:after", chunk)
        if tier.get("ns:after") is not None:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"tier did not serve again within {timeout_s} s")


def test_hung_server_costs_timeouts_only_until_the_breaker_opens(
    fresh_redis_server: RedisServer, make_redis_tier: Callable[..., RedisTier],
) -> None:
    server = fresh_redis_server
    tier = make_redis_tier(server.url, **{**FAST_BREAKER, "breaker_backoff_base_s": 0.5,
                                          "breaker_backoff_cap_s": 0.5})
    chunk = sample_chunk(2)
    tier.put("ns:k", chunk)
    server.pause()  # connections are accepted, nothing answers: every request would wait socket_timeout_s
    try:
        timings = []
        with gc_paused():
            for _ in range(12):
                start = time.perf_counter()
                assert tier.get("ns:k") is None
                timings.append(time.perf_counter() - start)
        # breaker_failures requests pay the read timeout; then the circuit is open and requests are instant.
        assert all(t >= 0.2 for t in timings[:2])
        assert tier.breaker.state == OPEN and max(timings[2:]) < OPEN_OP_BOUND_S
    finally:
        server.resume()
    time.sleep(0.55)
    got = tier.get("ns:k")  # the half-open trial succeeds; the entry was there all along
    assert got is not None and got.equals(chunk) and tier.breaker.state == CLOSED


def test_outage_under_concurrent_callers_raises_nothing(
    fresh_redis_server: RedisServer, make_redis_tier: Callable[..., RedisTier],
) -> None:
    server = fresh_redis_server
    tier = make_redis_tier(server.url, **FAST_BREAKER)
    chunk = sample_chunk(3)
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                tier.put(f"ns:w{n}-{i % 5}", chunk)
                tier.get(f"ns:w{n}-{i % 5}")
                tier.contains_many([f"ns:w{n}-0", f"ns:w{n}-1"])
            except Exception as exc:  # noqa: BLE001 - collected: the test asserts there are none
                errors.append(exc)
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.1)
        server.kill()
        time.sleep(0.4)
        server.restart()
        time.sleep(0.4)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert _wait_until_serving(tier, chunk) < 2.0
    assert tier.stats.snapshot()["errors"] > 0


def test_a_dead_cluster_master_costs_only_its_own_keys(
    tmp_path: Path, make_redis_tier: Callable[..., RedisTier],
) -> None:
    require_binaries("redis-server", "redis-cli")
    cluster = RedisClusterServers(tmp_path / "cluster").start()  # our own: this test kills a master
    try:
        tier = make_redis_tier(cluster.url, **FAST_BREAKER)
        chunk = sample_chunk(5)
        keys = [f"ns:k{i}" for i in range(30)]
        tier.put_many([(k, chunk) for k in keys])
        assert all(g is not None for g in tier.get_many(keys))
        cluster.nodes[1].kill()
        exceptions: list[BaseException] = []
        batched_hits = 0
        for _ in range(5):
            try:
                batched_hits += sum(g is not None for g in tier.get_many(keys))
                tier.put_many([(k, chunk) for k in keys[:5]])
                for k in keys[:10]:
                    tier.get(k)
            except Exception as exc:  # noqa: BLE001 - collected: the test asserts there are none
                exceptions.append(exc)
        assert exceptions == []
        # Batches go per master: keys on the two live masters still hit (before the cluster itself
        # declares the dead master failed, after cluster-node-timeout).
        assert 0 < batched_hits < 5 * len(keys)
        cluster.nodes[1].restart()  # same port and nodes.conf: it rejoins, empty
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            tier.put_many([(k, chunk) for k in keys])
            if all(g is not None for g in tier.get_many(keys)):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the cluster tier did not serve every key again after the restart")
    finally:
        cluster.stop()


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_nothing_listening_at_construction_is_a_miss(
    scheme: str, make_redis_tier: Callable[..., RedisTier],
) -> None:
    ports = [free_port() for _ in range(3 if scheme == "redis+cluster" else 1)]
    url = f"{scheme}://" + ",".join(f"127.0.0.1:{p}" for p in ports) + ("/0" if scheme == "redis" else "")
    tier = make_redis_tier(url, **FAST_BREAKER)  # must not raise
    chunk = sample_chunk(4)
    for _ in range(5):
        assert tier.get("ns:a") is None and tier.get_blob("ns:a") is None
        tier.put("ns:a", chunk)
        tier.pin("ns:a")
        assert not tier.contains("ns:a") and not tier.delete("ns:a") and list(tier.keys()) == []
        assert tier.get_many(["ns:a"]) == [None] and tier.contains_many(["ns:a"]) == [False]
        assert tier.delete_many(["ns:a"]) == 0
    stats = tier.stats.snapshot()
    assert stats["puts"] == 0 and stats["errors"] >= 5 and stats["hits"] == 0
    assert tier.breaker.times_opened == 1 and tier.describe()["circuit"] == OPEN


# -- corruption ---------------------------------------------------------------------------------------------
def _corrupt(blob: bytes, rng: random.Random) -> bytes:
    mode = rng.choice(["flip", "flip-many", "truncate", "extend", "empty"])
    if mode == "empty":
        return b""
    if mode == "truncate":
        return blob[:rng.randrange(0, len(blob))]
    if mode == "extend":
        return blob + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    out = bytearray(blob)
    for _ in range(1 if mode == "flip" else rng.randint(2, 8)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


@pytest.mark.parametrize("deployment, trials", [("single", 50), ("cluster", 20)])
def test_corrupted_values_are_detected_deleted_and_missed(
    deployment: str, trials: int, request: pytest.FixtureRequest, make_redis_tier: Callable[..., RedisTier],
) -> None:
    url = str(request.getfixturevalue("redis_url" if deployment == "single" else "redis_cluster_url"))
    tier = make_redis_tier(url)
    raw = raw_redis_client(url)
    rng = random.Random(20240611)
    readers: list[Callable[[str], Any]] = [
        tier.get, tier.get_blob, lambda k: tier.get_many([k])[0], lambda k: tier.get_many_blobs([k])[0],
    ]
    try:
        for trial in range(trials):
            key = f"ns{trial % 3}:c{trial}"
            tier.put(key, sample_chunk(trial, tokens=rng.randint(1, 40)))
            rkey = tier.config.key_prefix + key
            good = raw.get(rkey)
            bad = _corrupt(good, rng)
            assert bad != good
            raw.set(rkey, bad)
            assert readers[trial % len(readers)](key) is None, f"trial {trial}: corruption not detected"
            assert raw.exists(rkey) == 0, f"trial {trial}: corrupt entry not deleted"
        stats = tier.stats.snapshot()
        assert stats["corrupt"] == trials and stats["hits"] == 0 and stats["misses"] == trials
        assert list(tier.keys()) == []
    finally:
        raw.close()
