"""Prefill→decode hand-off through the store, against recomputing the prefill on the decode side.

SmolLM2-135M-Instruct, float32, CPU. Two engines over one store play the prefill and the decode worker (one
process: the store is all they share, so what is measured is the store's round trip, not a network). For each
planted-fact question (its documents warmed into the store first) and each store (Redis on loopback or a disk
tier, raw or cachegen level 2):

- ``handoff``: the prefill engine prepares the prompt with the default strategy (blend; not timed: it runs on
  the prefill worker either way) and publishes it; the decode engine resumes it (fetch + the last prompt
  token's first step). Latency = publish + fetch + first step.
- ``recompute (full)``: the decode engine runs a full prefill of the prompt: what it does without a hand-off
  and without a cache.
- ``recompute (blend)``: the decode engine prepares the prompt itself with the default strategy over the
  cached chunks: what a decode worker with the store but no hand-off would do.

Every path gets one untimed warm-up; the statistic is the median over questions of the per-question ratio.
Agreement: 16 greedy tokens decoded from the resumed context identical to those decoded in the prefill
engine from the same prepare (a lossy codec can change them).
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fidelity_set  # a sibling script: bench/ is on sys.path when a script here runs
from harness import RedisProcess, Report, median, parse_args

from ragkv.integrations.models import load_model, make_adapter
from ragkv.kvstore import TieredStore
from ragkv.middleware import ContextEngine, GenerationConfig, PrepareRequest

AGREEMENT_TOKENS = 16
CODECS = {"raw": "codec=raw", "cachegen level 2": "codec=cachegen&codec.level=2"}


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(adapter: Any, store: Any, requests: Sequence[PrepareRequest]) -> dict[str, Any]:
    prefill, decode = ContextEngine(adapter, store), ContextEngine(adapter, store)
    for r in requests:
        prefill.warm(list(r.chunks))
    generation = GenerationConfig(max_new_tokens=AGREEMENT_TOKENS)
    rows: dict[str, list[float]] = {"handoff": [], "publish": [], "fetch": [], "first_step": [], "full": [],
                                    "blend": [], "bytes": []}
    agree: list[bool] = []
    for i, request in enumerate([requests[0], *requests]):  # the first pass is the warm-up
        reference = prefill.generate(prefill.prepare(request), generation).token_ids
        prepared = prefill.prepare(request)
        handoff, publish_s = _timed(lambda p=prepared: prefill.publish(p, "bench"))
        resumed, resume_s = _timed(lambda h=handoff: decode.resume(h))
        tokens = decode.generate(resumed, generation).token_ids
        _, full_s = _timed(lambda r=request: decode.prepare(r, "full"))
        _, blend_s = _timed(lambda r=request: decode.prepare(r))
        if i == 0:
            continue
        rows["handoff"].append(publish_s + resume_s)
        rows["publish"].append(publish_s)
        rows["fetch"].append(resumed.timings["fetch"])
        rows["first_step"].append(resumed.timings["first_step"])
        rows["full"].append(full_s)
        rows["blend"].append(blend_s)
        rows["bytes"].append(handoff.stored_bytes)
        agree.append(list(tokens[:AGREEMENT_TOKENS]) == list(reference[:AGREEMENT_TOKENS]))
    return {"handoff_s": median(rows["handoff"]), "publish_s": median(rows["publish"]),
            "fetch_s": median(rows["fetch"]), "first_step_s": median(rows["first_step"]),
            "full_s": median(rows["full"]), "blend_s": median(rows["blend"]),
            "vs_full": median([h / f for h, f in zip(rows["handoff"], rows["full"])]),
            "vs_blend": median([h / b for h, b in zip(rows["handoff"], rows["blend"])]),
            "mib": median(rows["bytes"]) / 2**20, "agreement": sum(agree) / len(agree)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument("--questions", type=int, default=None))
    n = args.questions or (2 if args.quick else 12)
    report = Report("handoff", quick=args.quick, out=args.out)
    loaded = load_model("toy" if args.quick else None)
    adapter = make_adapter(loaded)
    if args.quick:
        requests = [PrepareRequest(query="Q k3 ?", chunks=["k1 v2 ; the k3 v4 ;", f"k{i} v{i + 1} ; see k9 v8 ;"])
                    for i in range(5, 5 + n)]
    else:
        requests = [PrepareRequest(query=q.question, chunks=list(q.documents)) for q in fidelity_set.load()[:n]]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ragkv-handoff-") as folder, \
            RedisProcess(Path(folder) / "redis") as redis:
        for codec, options in CODECS.items():
            for tier, spec in (("redis", f"{redis.url}?{options}"), ("disk", f"disk:{folder}/{len(results)}?{options}")):
                store = TieredStore(spec)
                try:
                    results[f"{tier}, {codec}"] = measure(adapter, store, requests)
                finally:
                    store.close()
    report.setup = {"model": f"{loaded.info.label}, float32, CPU" if not args.quick else "toy",
                    "prompts": f"{n} planted-fact questions (4-8 documents each), default strategy (blend)",
                    "workers": "two engines over one store in one process (the store is the only thing shared)",
                    "statistic": "median over questions of per-question ratios, one untimed warm-up per path",
                    "agreement": f"first {AGREEMENT_TOKENS} greedy tokens after resuming vs decoding in place"}
    report.table("hand-off latency (publish + fetch + first step) vs recomputing on the decode side",
                 ["store", "MiB", "publish s", "fetch s", "first step s", "hand-off s", "full prefill s",
                  "blend s", "hand-off / full", "hand-off / blend", "agreement"],
                 [[name, r["mib"], r["publish_s"], r["fetch_s"], r["first_step_s"], r["handoff_s"], r["full_s"],
                   r["blend_s"], r["vs_full"], r["vs_blend"], r["agreement"]] for name, r in results.items()])
    best = results["redis, raw"]
    report.figure("handoff_vs_recompute", best["vs_full"])
    report.figure("handoff_vs_blend", best["vs_blend"])
    report.figure("handoff_agreement_raw", best["agreement"])
    report.figure("handoff_cachegen_redis_vs_recompute", results["redis, cachegen level 2"]["vs_full"])
    report.figure("handoff_cachegen_agreement", results["redis, cachegen level 2"]["agreement"])
    report.write()


if __name__ == "__main__":
    main()
