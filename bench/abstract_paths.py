"""The chunk-abstract half of ``reuse_decisions`` (LeoAM): leave out the chunks whose abstract bound is far below
the others', against fetching every chunk, with chunks on a cold disk tier and in Redis.

Prompts: each planted-fact question's documents (the ones its answer needs plus its world's distractors) padded
with documents of other questions to ``size`` chunks (16 and 32), shuffled; so a few chunks matter. Every chunk
and its abstract are stored before timing; each abstract path's engine has read the abstracts once (they sit in
its in-process cache, the fast tier they are meant for), while the chunks sit on the slow tier only: a disk tier
(raw codec) whose files are dropped from the page cache before every prepare, or a Redis server on loopback
(raw codec). Both paths use the engine's default strategy (blend, uncalibrated defaults) and get the same
warm-up (one untimed prepare). Per question and path: TTFT = prepare time; bytes fetched = the stored blob
sizes of the chunks read from the slow tier, plus, for the abstract paths, the abstracts' bytes; 16 greedy
tokens for agreement (with the fetch-everything path, and with full prefill) and accuracy (the gold answer in
the text).
"""
from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness import RedisProcess, drop_dir_from_page_cache, median

from ragkv.kvstore import TieredStore
from ragkv.middleware import ContextEngine, EngineConfig, GenerationConfig, PrepareRequest
from ragkv.middleware.abstract_selection import AbstractsConfig

AGREEMENT_TOKENS = 16
ALL = "fetch everything"


def padded_prompts(questions: Sequence[Any], pool: Sequence[str], size: int, seed: int) -> list[tuple[Any, list[str]]]:
    """Each question's documents padded with other documents of ``pool`` to ``size`` chunks, shuffled."""
    rng = random.Random(seed)
    out = []
    for q in questions:
        own = list(q.documents)
        others = [d for d in pool if d not in own]
        docs = own + rng.sample(others, max(0, size - len(own)))
        rng.shuffle(docs)
        out.append((q, docs))
    return out


def _path_engines(adapter: Any, store: Any, thresholds: Sequence[float]) -> dict[str, ContextEngine]:
    engines = {ALL: ContextEngine(adapter, store, EngineConfig())}
    for t in thresholds:
        engines[f"abstracts, threshold {t:g}"] = ContextEngine(
            adapter, store, EngineConfig(abstracts=AbstractsConfig(enabled=True, threshold=t)))
    return engines


def measure_tier(adapter: Any, store: Any, prompts: Sequence[tuple[Any, list[str]]], thresholds: Sequence[float],
                 full_tokens: Sequence[list[int]], before: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """Every prompt through fetch-everything and one abstract path per threshold, over ``store`` (a slow tier
    alone); ``before`` runs before every timed prepare (drops the page cache for the disk tier)."""
    engines = _path_engines(adapter, store, thresholds)
    writer = engines[next(p for p in engines if p != ALL)]
    texts = list(dict.fromkeys(d for _, docs in prompts for d in docs))
    keys = writer.warm(texts).keys  # chunks and their abstracts
    blob_bytes = {k: len(store.get_blob(k)) for k in keys}
    for path, engine in engines.items():
        if path != ALL:
            for key in keys:
                engine.abstracts.read(key)  # resident in the engine's abstract cache
    abstract_bytes = writer.abstracts.read(keys[0]).nbytes
    generation = GenerationConfig(max_new_tokens=AGREEMENT_TOKENS)
    rows: dict[str, dict[str, list[Any]]] = {p: {"ttft": [], "bytes": [], "tokens": [], "correct": [], "skipped": [],
                                                 "needed_skipped": []} for p in engines}
    first_q, first_docs = prompts[0]
    for engine in engines.values():  # the same warm-up for every path
        engine.prepare(PrepareRequest(query=first_q.question, chunks=first_docs))
    for q, docs in prompts:
        needed = {q.documents[i] for i in q.needed}
        for path, engine in engines.items():
            before()
            start = time.perf_counter()
            prepared = engine.prepare(PrepareRequest(query=q.question, chunks=docs))
            r = rows[path]
            r["ttft"].append(time.perf_counter() - start)
            skipped = [c for c in prepared.chunks if c.source == "skipped"]
            fetched = sum(blob_bytes.get(c.key, 0) for c in prepared.chunks if c.source == "store")
            scored = sum(c.abstract_gap is not None for c in prepared.chunks)
            r["bytes"].append(fetched + scored * abstract_bytes)
            r["skipped"].append(len(skipped) / len(docs))
            r["needed_skipped"].append(any(docs[c.index] in needed for c in skipped))
            result = engine.generate(prepared, generation)
            r["tokens"].append(list(result.token_ids)[:AGREEMENT_TOKENS])
            r["correct"].append(q.answer.lower() in result.text.lower())
    base = rows[ALL]
    out: dict[str, Any] = {}
    for path, r in rows.items():
        out[path] = {
            "ttft_s": median(r["ttft"]),
            "ttft_vs_all": median([a / b for a, b in zip(r["ttft"], base["ttft"])]),
            "bytes_vs_all": sum(r["bytes"]) / sum(base["bytes"]),
            "mib_fetched": sum(r["bytes"]) / len(r["bytes"]) / 2**20,
            "skipped_share": sum(r["skipped"]) / len(r["skipped"]),
            "needed_skipped": sum(r["needed_skipped"]),
            "agreement_vs_all": agreement(r["tokens"], base["tokens"]),
            "agreement_vs_full": agreement(r["tokens"], full_tokens),
            "accuracy": sum(r["correct"]) / len(r["correct"]),
        }
    return out


def full_prefill_tokens(engine: ContextEngine, prompts: Sequence[tuple[Any, list[str]]]) -> list[list[int]]:
    generation = GenerationConfig(max_new_tokens=AGREEMENT_TOKENS)
    return [list(engine.generate(PrepareRequest(query=q.question, chunks=docs), generation, "full").token_ids)
            [:AGREEMENT_TOKENS] for q, docs in prompts]


def run_abstracts(adapter: Any, questions: Sequence[Any], pool: Sequence[str], sizes: Sequence[int],
                  thresholds: Sequence[float], redis_thresholds: Sequence[float]) -> dict[str, Any]:
    """{size: {"disk": {path: figures}, "redis": {path: figures}}}."""
    reference = ContextEngine(adapter, TieredStore("host:1GB"), EngineConfig())
    results: dict[str, Any] = {}
    for size in sizes:
        prompts = padded_prompts(questions, pool, size, seed=size)
        full = full_prefill_tokens(reference, prompts)
        with tempfile.TemporaryDirectory(prefix="ragkv-abstracts-") as folder:
            disk = TieredStore(f"disk:{folder}")
            try:
                on_disk = measure_tier(adapter, disk, prompts, thresholds, full,
                                       before=lambda f=folder: drop_dir_from_page_cache(f))
            finally:
                disk.close()
            with RedisProcess(Path(folder) / "redis") as redis:
                remote = TieredStore(redis.url)
                try:
                    in_redis = measure_tier(adapter, remote, prompts, redis_thresholds, full)
                finally:
                    remote.close()
        results[str(size)] = {"disk": on_disk, "redis": in_redis}
    return results


def agreement(a: Sequence[list[int]], b: Sequence[list[int]]) -> float:
    """The share of answers whose token lists are identical."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


__all__ = ["ALL", "agreement", "padded_prompts", "run_abstracts"]
