"""The cache-sizing simulator against a real run of the same trace, and a sweep of tier sizes.

Validation (SmolLM2-135M-Instruct, float32, CPU): a Zipf trace over planted-fact documents (their real token
counts) is answered for real, one request at a time, by a ``RagRuntime`` (the engine the service runs; the
default strategy, one token per answer) over a small host tier in front of a disk tier (raw codec), so chunks
are evicted, promoted and recomputed. Per document the tier it came from (or a miss) and per request the TTFT
are recorded. The simulator replays the same trace over the same tier spec with costs measured beforehand on
this machine (``measure_costs``, on other documents than the trace's). Compared: the hit rate of each tier and
the miss rate (percentage points), and mean TTFT (relative error).

Sweep: a larger synthetic Zipf trace (sizes uniform in 60-250 tokens) over host x disk sizes with the same
costs: hit rates and estimated TTFT p50/p99, plotted in ``bench/simulate_sweep.png``.
"""
from __future__ import annotations

import statistics
import tempfile
from typing import Any

import fidelity_set  # a sibling script: bench/ is on sys.path when a script here runs
from harness import BENCH_DIR, Report, parse_args

from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions
from ragkv.integrations.models import load_model
from ragkv.integrations.runtime import RagRuntime
from ragkv.integrations.sim_costs import measure_costs
from ragkv.integrations.sim_trace import zipf_trace
from ragkv.integrations.simulator import Simulator, modelled_tiers, sweep
from ragkv.kvstore import TieredStore

QUERY = "What do these documents say about the people, towns and companies they name?"


def real_run(runtime: RagRuntime, trace: Any, texts: dict[str, str]) -> dict[str, Any]:
    """Answer every request of ``trace``; per-tier hit counts, misses and TTFTs."""
    hits: dict[str, int] = {}
    misses, lookups, ttft = 0, 0, []
    for request in trace:
        answer = runtime.answer(AnswerRequest(query=QUERY, documents=[Document(text=texts[c]) for c, _ in request.chunks],
                                              generation=GenerationOptions(max_new_tokens=1)))
        ttft.append(answer.ttft_s)
        for d in answer.documents:
            lookups += 1
            if d.hit and d.tier:
                hits[d.tier] = hits.get(d.tier, 0) + 1
            else:
                misses += 1
    return {"hit_rate": {t: n / lookups for t, n in hits.items()}, "miss_rate": misses / lookups,
            "ttft_mean_s": statistics.fmean(ttft), "lookups": lookups}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    report = Report("simulate", quick=args.quick, out=args.out)
    quick = args.quick
    loaded = load_model("toy" if quick else None)
    documents = sorted({d for q in fidelity_set.load() for d in q.documents})
    if quick:
        documents = [f"k{i} v{i + 1} ; the k{i + 2} v{i + 3} ; see k{i + 4} v{i + 5} ;" for i in range(0, 40, 2)]
    n_chunks, n_requests = (12, 16) if quick else (40, 80)
    trace_docs, cost_docs = documents[:n_chunks], documents[n_chunks:n_chunks + 8]
    with tempfile.TemporaryDirectory(prefix="ragkv-simulate-") as folder:
        with RagRuntime(loaded, TieredStore("host:64MB"), own_store=True, use_calibration=False) as probe:
            sizes = [len(probe.chunk_tokens(t)) for t in trace_docs]
            per_token = probe.chunk_bytes(1)
            mean_chunk = statistics.fmean(sizes) * per_token
            host_bytes, disk_bytes = int(0.25 * n_chunks * mean_chunk), int(0.6 * n_chunks * mean_chunk)
            spec = f"host:{host_bytes},disk:{folder}/disk:{disk_bytes}"
            costs = measure_costs(probe, spec, cost_docs, repeats=1 if quick else 3)
        trace = zipf_trace(n_requests, n_chunks, per_request=4, alpha=1.0, seed=5, sizes=sizes)
        texts = {f"c{i}": t for i, t in enumerate(trace_docs)}
        with RagRuntime(loaded, TieredStore(spec), own_store=True, use_calibration=False) as runtime:
            real = real_run(runtime, trace, texts)
        predicted = Simulator(modelled_tiers(spec), costs).run(trace).summary()
    tiers = predicted["tiers"]
    rows, errors = [], []
    for name in tiers:
        r, p = real["hit_rate"].get(name, 0.0), predicted["hit_rate"][name]
        rows.append([f"{name} hit rate", r, p, 100 * abs(p - r)])
        errors.append(100 * abs(p - r))
    rows.append(["miss rate", real["miss_rate"], predicted["miss_rate"], 100 * abs(predicted["miss_rate"] - real["miss_rate"])])
    errors.append(rows[-1][3])
    ttft_error = abs(predicted["ttft_mean_s"] - real["ttft_mean_s"]) / real["ttft_mean_s"]
    rows.append(["mean TTFT s", real["ttft_mean_s"], predicted["ttft_mean_s"], ttft_error])
    report.setup = {"model": f"{loaded.info.label}, float32, CPU" if not quick else "toy",
                    "validation": f"Zipf(1.0) trace of {n_requests} requests x 4 of {n_chunks} planted-fact documents, "
                                  f"answered one at a time by RagRuntime over '{spec.replace(folder, '<tmp>')}' "
                                  "(host ~25 %, disk ~60 % of the documents' KV)",
                    "costs": costs.to_dict()}
    report.table("validation: a real run vs the simulator on the same trace and tiers",
                 ["figure", "real", "simulated", "error (points or ratio)"], rows)
    report.figure("sim_hit_rate_error_points", max(errors))
    report.figure("sim_ttft_error_ratio", ttft_error)

    big = zipf_trace(300 if quick else 3000, 60 if quick else 600, per_request=4, alpha=1.0, seed=9)
    mean_big = statistics.fmean(n for r in big for _, n in r.chunks) * per_token
    corpus = (60 if quick else 600) * mean_big
    grid = {"host": [int(f * corpus) for f in (0.05, 0.1, 0.2, 0.4)], "disk": [int(f * corpus) for f in (0.3, 0.6)]}
    swept = sweep(big, f"host:1GB,disk:{tempfile.gettempdir()}/ragkv-sim-unused:1GB", costs, grid)
    report.table("sweep: estimated hit rates and TTFT by host and disk size (synthetic Zipf trace)",
                 ["host GB", "disk GB", "host hit", "disk hit", "miss", "TTFT p50 s", "TTFT p99 s"],
                 [[r["sizes"]["host"] / 1e9, r["sizes"]["disk"] / 1e9, r["hit_rate"]["host"], r["hit_rate"]["disk"],
                   r["miss_rate"], r["ttft_p50_s"], r["ttft_p99_s"]] for r in swept])
    if not quick:
        from ragkv.integrations.cli_simulate import plot_sweep

        plot_sweep(swept, grid, str(BENCH_DIR / "simulate_sweep.png"))
    report.write()


if __name__ == "__main__":
    main()
