"""Reuse decisions on the real model: near-duplicate chunks (KVShare) against treating an edit as a miss.

SmolLM2-135M-Instruct, float32, host-memory store. For every question of the planted-fact set
(``fidelity_set``) and every edit share (1 %, 5 %, 20 % of the tokens), the document the answer needs is
edited at token level — a seeded mix of replacements, insertions and deletions with tokens of the other
documents, so the planted fact is sometimes inside an edit — while every original document is stored.
Three paths answer the edited prompt (16 greedy tokens):

- ``full``: full prefill of the edited prompt (the reference for agreement, and for TTFT);
- ``miss``: the default strategy (blend) with the edited document computed as a miss, as today;
- ``near-duplicate``: the same strategy with the edited document repaired from the stored original.

Each path runs in its own namespace (its own stored originals), so neither sees the other's writes. TTFT is
the prepare time (the first token comes from the prepared logits), one cold run per question and path, the
median over questions; agreement = the first 16 greedy tokens identical to full's. ``near vs miss`` isolates
what the repair changes from what blend's cross-chunk reuse already changes on this model.

Chunk abstracts (LeoAM): ``abstract_paths`` (its docstring says how): prompts of 16 and 32 chunks, chunks on a
cold disk tier and in Redis, leaving out the chunks far below the others against fetching everything.
"""
from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import fidelity_set  # a sibling script: bench/ is on sys.path when a script here runs
from abstract_paths import ALL, agreement, run_abstracts
from harness import Report, median, parse_args

from ragkv.integrations.models import load_model, make_adapter
from ragkv.kvstore import TieredStore
from ragkv.middleware import ContextEngine, EngineConfig, GenerationConfig, PrepareRequest
from ragkv.middleware.abstract_selection import AbstractsConfig
from ragkv.middleware.near_duplicate_reuse import NearDuplicateConfig

AGREEMENT_TOKENS = 16
FRACTIONS = (0.01, 0.05, 0.2)
NEAR = "near-duplicate"
DEFAULT_NEAR = NearDuplicateConfig(enabled=True)
ABSTRACT_SIZES = (16, 32)
ABSTRACT_THRESHOLDS = (2.0, 2.5, 3.0)  # leave-out thresholds measured on the disk tier (3.0: the default)
REDIS_THRESHOLDS = (3.0,)
VARIANTS = {  # the repair budget at 5 % edits: (neighbours, ratio of the other kept rows by K deviation)
    "near, neighbours 0, ratio 0": NearDuplicateConfig(enabled=True, neighbours=0, ratio=0.0),
    "near, neighbours 2, ratio 0": NearDuplicateConfig(enabled=True, neighbours=2, ratio=0.0),
    "near, neighbours 4, ratio 0.3": NearDuplicateConfig(enabled=True, neighbours=4, ratio=0.3),
}


def edit_tokens(ids: Sequence[int], fraction: float, pool: Sequence[int], rng: random.Random) -> list[int]:
    """``ids`` with ``max(1, fraction * len)`` edits: replace, insert or delete one token each."""
    out = list(ids)
    for _ in range(max(1, round(fraction * len(ids)))):
        op = rng.choice(("replace", "insert", "delete")) if len(out) > 2 else "insert"
        at = rng.randrange(len(out))
        if op == "replace":
            out[at] = rng.choice(pool)
        elif op == "insert":
            out.insert(at, rng.choice(pool))
        else:
            del out[at]
    return out


def run(engine: ContextEngine, questions: Sequence[Any], fraction: float, seed: int,
        near: dict[str, NearDuplicateConfig]) -> dict[str, Any]:
    """Every question through full, miss and each near-duplicate config in ``near`` (the first is the default)."""
    cacher = engine.cacher
    rng = random.Random(seed)
    generation = GenerationConfig(max_new_tokens=AGREEMENT_TOKENS)
    paths = ["full", "miss", *near]
    rows: dict[str, dict[str, list[Any]]] = {p: {"ttft": [], "tokens": [], "correct": []} for p in paths}
    repaired: dict[str, list[float]] = {name: [] for name in near}
    for qi, q in enumerate(questions):
        docs = [cacher.tokens(d) for d in q.documents]
        target = q.needed[0]
        pool = [t for i, d in enumerate(docs) if i != target for t in d]
        edited = list(docs)
        edited[target] = edit_tokens(docs[target], fraction, pool, rng)
        for pi, path in enumerate(paths):
            namespace = f"q{qi}-p{pi}-{int(fraction * 100)}"
            engine.near_duplicates.config = near.get(path, NearDuplicateConfig())
            if path != "full":
                engine.warm(docs, namespace=namespace)  # the originals are stored (and indexed when enabled)
            request = PrepareRequest(query=q.question, chunks=edited, namespace=namespace)
            start = time.perf_counter()
            prepared = engine.prepare(request, "full" if path == "full" else None)
            rows[path]["ttft"].append(time.perf_counter() - start)
            if path in near:
                info = prepared.chunks[target]
                repaired[path].append(info.repaired_tokens / info.num_tokens if info.source == NEAR else 1.0)
            result = engine.generate(prepared, generation)
            rows[path]["tokens"].append(list(result.token_ids)[:AGREEMENT_TOKENS])
            rows[path]["correct"].append(q.answer.lower() in result.text.lower())
    full, miss = rows["full"], rows["miss"]
    out: dict[str, Any] = {}
    for path in paths:
        r = rows[path]
        out[path] = {"ttft_s": median(r["ttft"]), "ttft_vs_full": median([a / b for a, b in zip(r["ttft"], full["ttft"])]),
                     "agreement": agreement(r["tokens"], full["tokens"]), "accuracy": sum(r["correct"]) / len(r["correct"])}
        if path in near:
            out[path].update(vs_miss=agreement(r["tokens"], miss["tokens"]), repaired=median(repaired[path]),
                             hits=sum(x < 1.0 for x in repaired[path]))
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument("--questions", type=int, default=None))
    n = args.questions or (2 if args.quick else 24)
    report = Report("reuse_decisions", quick=args.quick, out=args.out)
    loaded = load_model("toy" if args.quick else None)
    engine = ContextEngine(make_adapter(loaded), TieredStore("host:8GB"), EngineConfig())
    every_question = fidelity_set.load()
    questions = every_question[:n]
    pool = sorted({d for q in every_question for d in q.documents})
    sizes, thresholds, redis_thresholds = ABSTRACT_SIZES, ABSTRACT_THRESHOLDS, REDIS_THRESHOLDS
    if args.quick:  # the toy model's vocabulary: its own sample questions' shape is enough to run the paths
        questions = [fidelity_set.Question(("k1 v2 ; the k3 v4 ; see k5 v6 ;", "k7 v8 ; the k9 v10 ;"),
                                           "Q k3 ?", "v4", "single", (0,))] * n
        pool = [f"k{i} v{i + 1} ; the k{i + 2} v{i + 3} ;" for i in range(11, 41, 3)]
        sizes, thresholds, redis_thresholds = (8,), (0.0,), (0.0,)
    engine.prepare(PrepareRequest(query=questions[0].question, chunks=list(questions[0].documents)), "full")  # warm-up
    results = {f: run(engine, questions, f, seed=int(f * 1000),
                      near={NEAR: DEFAULT_NEAR, **(VARIANTS if f == 0.05 else {})}) for f in FRACTIONS}
    report.setup = {"model": f"{loaded.info.label} (real weights), float32, CPU" if not args.quick else "toy",
                    "questions": f"{n} planted-fact questions (bench/data/fidelity_set.jsonl); the needed document "
                                 "edited at token level (replace / insert / delete, tokens of the other documents)",
                    "paths": "full prefill; default strategy (blend) with the edit as a miss; the same with "
                             "near-duplicate repair (NearDuplicateConfig defaults: similarity 0.5, min_reused 0.8, "
                             "neighbours 2, ratio 0.1, check layers 2-3; at 5 % also other repair budgets)",
                    "ttft": "prepare time, one cold run per question and path, median over questions",
                    "agreement": f"first {AGREEMENT_TOKENS} greedy tokens identical to full prefill's"}
    report.table("edited documents: near-duplicate repair vs a miss (medians over questions)",
                 ["edit share", "path", "TTFT s", "TTFT vs full", "agreement vs full", "accuracy",
                  "agreement vs miss", "repaired share (median)", "near-duplicate hits"],
                 [[f"{int(f * 100)}%", path, v["ttft_s"], v["ttft_vs_full"], v["agreement"], v["accuracy"],
                   v.get("vs_miss"), v.get("repaired"), v.get("hits")]
                  for f, r in results.items() for path, v in r.items()])
    for f, r in results.items():
        pct = int(f * 100)
        report.figure(f"near_dup_{pct}pct_ttft_vs_full", r[NEAR]["ttft_vs_full"])
        report.figure(f"near_dup_{pct}pct_agreement", r[NEAR]["agreement"])
        report.figure(f"near_dup_{pct}pct_vs_miss_agreement", r[NEAR]["vs_miss"])
        report.figure(f"near_dup_{pct}pct_hits", r[NEAR]["hits"])
        report.figure(f"miss_{pct}pct_ttft_vs_full", r["miss"]["ttft_vs_full"])
        report.figure(f"miss_{pct}pct_agreement", r["miss"]["agreement"])
    abstracts = run_abstracts(engine.adapter, questions, pool, sizes, thresholds, redis_thresholds)
    report.setup["abstracts"] = ("prompts of 16 and 32 chunks (the question's documents + other questions' "
                                 "documents), default strategy (blend); chunks alone on a disk tier (raw codec, page "
                                 "cache dropped before every prepare) or in Redis on loopback (raw codec); abstracts "
                                 "over the first 8 layers read from the engine's in-process cache; same warm-up for "
                                 "both paths; bytes fetched include the abstracts'")
    report.table("chunk abstracts: leave out chunks far below the others vs fetch everything (TTFT: median over "
                 "questions of the per-question ratio)",
                 ["chunks", "tier", "path", "TTFT s", "TTFT vs all", "bytes vs all", "MiB fetched / prompt",
                  "skipped share", "questions with a needed doc skipped", "agreement vs all", "agreement vs full",
                  "accuracy"],
                 [[size, tier, path, v["ttft_s"], v["ttft_vs_all"], v["bytes_vs_all"], v["mib_fetched"],
                   v["skipped_share"], v["needed_skipped"], v["agreement_vs_all"], v["agreement_vs_full"],
                   v["accuracy"]]
                  for size, by_tier in abstracts.items() for tier, paths in by_tier.items()
                  for path, v in paths.items()])
    headline = abstracts[str(sizes[-1])]
    default = f"abstracts, threshold {AbstractsConfig().threshold:g}" if not args.quick else \
        next(p for p in headline["disk"] if p != ALL)
    report.figure("abstracts_bytes_fetched_vs_all", headline["disk"][default]["bytes_vs_all"])
    report.figure("abstracts_ttft_vs_all_cold_disk", headline["disk"][default]["ttft_vs_all"])
    report.figure("abstracts_agreement_vs_all", headline["disk"][default]["agreement_vs_all"])
    report.figure("abstracts_accuracy", headline["disk"][default]["accuracy"])
    report.figure("all_accuracy", headline["disk"][ALL]["accuracy"])
    if default in headline["redis"]:
        report.figure("abstracts_ttft_vs_all_redis", headline["redis"][default]["ttft_vs_all"])
    report.write()


if __name__ == "__main__":
    main()
