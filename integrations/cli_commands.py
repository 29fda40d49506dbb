"""The model-backed subcommands of ``ragkv``: serve, warm, ask, bench, calibrate (``cli.py`` holds the parser).

Why they live apart from the parser: each needs the model stack (transformers, torch) and some the service
stack (fastapi, uvicorn); importing them only when the subcommand runs keeps ``ragkv demo``/``stats`` and
``ragkv --help`` fast and working without those extras.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ragkv.kvstore.errors import ConfigError


def cmd_serve(args: argparse.Namespace) -> int:
    from ragkv.integrations.service import ServiceConfig, serve
    from ragkv.integrations.service_http import ServiceLimits

    limits = ServiceLimits(max_chunk_bytes=args.max_chunk_bytes, max_json_bytes=args.max_json_bytes,
                           max_documents=args.max_documents, max_new_tokens=args.max_new_tokens,
                           max_waiting=args.max_waiting)
    config = ServiceConfig(store=args.store, model=args.model, dtype=args.dtype, device=args.device, host=args.host,
                           port=args.port, near_duplicates=args.near_duplicates, abstracts=args.abstracts,
                           abstract_threshold=args.abstract_threshold, role=args.role,
                           record_trace=args.record_trace,
                           api_keys_file=args.api_keys, limits=limits, sample=not args.no_sample,
                           allow_open_remote=args.allow_open_remote, log_level=args.log_level)
    return serve(config)


def _batches(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def cmd_warm(args: argparse.Namespace) -> int:
    """Precompute a corpus's chunk KV; chunks already stored are skipped, so an interrupted run resumes."""
    from ragkv.integrations.corpus import ProgressBar, read_corpus
    from ragkv.integrations.runtime import RagRuntime

    chunks = read_corpus(args.corpus, split=args.split, text_field=args.text_field)
    print(f"corpus: {len(chunks)} chunks from {args.corpus}", file=sys.stderr)
    index = None
    if args.index:
        from ragkv.integrations.faiss_retriever import FaissIndex

        index = FaissIndex.open(args.index, args.embedder)
    with RagRuntime.open(args.store, args.model, dtype=args.dtype, device=args.device) as runtime:
        print(f"model: {runtime.info.name} ({runtime.info.kind}); store: {runtime.store!r}", file=sys.stderr)
        usable = []
        for text in chunks:
            if len(runtime.chunk_tokens(text)) <= runtime.max_chunk_tokens:
                usable.append(text)
        if len(usable) < len(chunks):
            print(f"skipping {len(chunks) - len(usable)} chunks longer than {runtime.max_chunk_tokens} tokens "
                  f"(split them smaller)", file=sys.stderr)
        bar = ProgressBar(len(usable), "warm", out=sys.stderr)
        computed = cached = 0
        last_save = time.monotonic()
        try:
            for batch in _batches(usable, args.batch_size):
                report = runtime.warm(list(batch), args.namespace)
                computed += report.computed
                cached += report.already_cached
                if index is not None:
                    index.add(list(batch))
                    if time.monotonic() - last_save > 30:
                        index.save()
                        last_save = time.monotonic()
                bar.update(len(batch), f"{computed} computed, {cached} already stored")
        finally:
            bar.close()
            runtime.store.flush()
            if index is not None:
                index.save()
        print(f"warmed {len(usable)} chunks into namespace '{args.namespace}': {computed} computed, "
              f"{cached} already stored" + (f"; index {args.index} holds {len(index)} chunks" if index else ""))
    return 0


def _ask_documents(args: argparse.Namespace, question: str) -> tuple[list[str], str | None]:
    """Documents for ``ask`` (and the sample's expected answer when --sample is used)."""
    expected = None
    documents: list[str] = list(args.doc or [])
    if args.docs:
        from ragkv.integrations.corpus import read_corpus

        documents += read_corpus(args.docs)
    if args.index:
        from ragkv.integrations.faiss_retriever import FaissIndex

        index = FaissIndex.load(args.index, args.embedder)
        documents += [h.text for h in index.search(question, args.k)]
    return documents, expected


def _format_split(timings: dict[str, float]) -> str:
    parts = [f"{name.replace('_', ' ')} {timings[name]:.1f}" for name in ("gather", "compute", "load_wait", "prune")
             if name in timings]
    return (f"prepare {timings.get('prepare', 0.0):.1f} ms ({', '.join(parts)}) + first token "
            f"{timings.get('first_token', 0.0):.1f} ms")


def print_answer(result: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    print(f"answer: {result['answer']}", file=out)
    print(f"TTFT {result['ttft_ms']:.1f} ms = {_format_split(result['timings_ms'])}   [{result['strategy']}]", file=out)
    docs = result["documents"]
    if docs:
        hits = [d for d in docs if d["hit"]]
        tiers: dict[str, int] = {}
        for d in hits:
            tiers[str(d["tier"])] = tiers.get(str(d["tier"]), 0) + 1
        where = ", ".join(f"{t}: {n}" for t, n in sorted(tiers.items()))
        print(f"documents: {len(hits)} of {len(docs)} from the cache" + (f" ({where})" if where else ""), file=out)
        print(f"  {'#':>3}  {'hit':<4} {'tier':<8} {'codec':<9} {'tokens':>6} {'recomputed':>10}  source", file=out)
        for d in docs:
            print(f"  {d['index']:>3}  {'yes' if d['hit'] else 'no':<4} {d['tier'] or '-'!s:<8} "
                  f"{d['codec'] or '-'!s:<9} {d['tokens']:>6} {d['recomputed_tokens']:>10}  {d['source']}", file=out)


def cmd_ask(args: argparse.Namespace) -> int:
    """One RAG question from the shell: the answer, the TTFT split, and what the cache did."""
    question = args.question
    expected = None
    if args.sample is not None:
        from ragkv.integrations.sample_corpus import sample_for_model

        corpus = sample_for_model(args.model)
        if not 0 <= args.sample < len(corpus.questions):
            raise ConfigError(f"--sample takes 0..{len(corpus.questions) - 1}")
        q = corpus.questions[args.sample]
        question = question or q.question
        documents, expected = list(q.chunks), q.answer
    else:
        if not question:
            raise ConfigError("ask needs a question (or --sample N)")
        documents, expected = _ask_documents(args, question)
    options = {"strategy": args.strategy, "max_new_tokens": args.max_new_tokens, "system": args.system}
    if args.url:
        from ragkv.integrations.client import RagkvClient

        with RagkvClient(args.url, args.api_key) as client:
            def run(strategy: str | None) -> dict[str, Any]:
                return client.generate(question, documents, **{**options, "strategy": strategy})

            result, baseline = _answer_and_baseline(run, args.strategy, args.compare)
    else:
        from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions, readable_namespaces
        from ragkv.integrations.runtime import RagRuntime

        with RagRuntime.open(args.store, args.model, dtype=args.dtype, device=args.device) as runtime:
            def run(strategy: str | None) -> dict[str, Any]:
                request = AnswerRequest(query=question, documents=[Document(text=d) for d in documents],
                                        system=args.system, namespace=args.namespace,
                                        readable_namespaces=readable_namespaces(args.namespace), strategy=strategy,
                                        generation=GenerationOptions(max_new_tokens=args.max_new_tokens))
                return runtime.answer(request).to_dict()

            result, baseline = _answer_and_baseline(run, args.strategy, args.compare)
            runtime.store.flush()
    if args.json:
        print(json.dumps({"result": result, "full": baseline, "expected": expected}, indent=2))
        return 0
    print_answer(result)
    if expected is not None:
        correct = expected.lower() in result["answer"].lower()
        print(f"expected: {expected} ({'correct' if correct else 'wrong'})")
    if baseline is not None:
        ratio = result["ttft_ms"] / baseline["ttft_ms"] if baseline["ttft_ms"] > 0 else float("nan")
        print(f"full prefill: TTFT {baseline['ttft_ms']:.1f} ms, answer {baseline['answer']!r}; "
              f"{result['strategy']} takes {ratio:.2f}x of it (both warm: one untimed run of each first)")
    return 0


def _answer_and_baseline(run: Any, strategy: str | None, compare: bool) -> tuple[dict[str, Any], Any]:
    """The answer, and with ``compare`` full prefill's, each timed after one untimed run of the same kind, so
    neither pays for loading, warming chunks or first-call set-up."""
    if not compare:
        return run(strategy), None
    run(strategy)
    run("full")
    return run(strategy), run("full")


def cmd_bench(args: argparse.Namespace) -> int:
    """A quick in-process benchmark: TTFT cold / warm / full on the sample questions, and 1 MB store gets."""
    import torch

    from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions, readable_namespaces
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.integrations.sample_corpus import sample_for_model
    from ragkv.kvstore import ChunkKV, ChunkMeta, chunk_key

    corpus = sample_for_model(args.model)
    questions = corpus.questions[:args.questions]
    namespace = f"bench-{uuid.uuid4().hex[:8]}"  # a fresh namespace: the first pass is truly cold
    results: dict[str, Any] = {}
    with RagRuntime.open(args.store, args.model, dtype=args.dtype, device=args.device) as runtime:
        def ttft(strategy: str | None, q: Any) -> float:
            request = AnswerRequest(query=q.question, documents=[Document(text=c) for c in q.chunks],
                                    namespace=namespace, readable_namespaces=readable_namespaces(namespace),
                                    strategy=strategy, generation=GenerationOptions(max_new_tokens=1))
            return runtime.answer(request).ttft_s * 1e3

        ttft(args.strategy, corpus.questions[-1])  # first-call overheads (allocations, kernels) out of the way
        cold = [ttft(args.strategy, q) for q in questions]
        warm = [ttft(args.strategy, q) for q in questions]
        full = [ttft("full", q) for q in questions]
        results["ttft_ms"] = {"cold": statistics.median(cold), "warm": statistics.median(warm),
                              "full": statistics.median(full)}
        results["warm_vs_cold"] = results["ttft_ms"]["warm"] / results["ttft_ms"]["cold"]
        results["warm_vs_full"] = results["ttft_ms"]["warm"] / results["ttft_ms"]["full"]
        # 1 MB chunks through the store: put once, get repeatedly
        store, keys = runtime.store, []
        kv = torch.zeros(8, 2, 8, 64, 64, dtype=torch.float16)  # [L, 2, H, T, D] = 1 MiB
        for i in range(8):
            ids = tuple(range(i * 64, i * 64 + 64))
            key = chunk_key("bench", namespace, ids)
            store.put(key, ChunkKV(kv, ChunkMeta("bench", ids, position=1)))
            keys.append(key)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds:
            for key in keys:
                blob = store.get_blob(key)
                n += len(blob or b"")
        results["store_get_blob_mbps"] = n / 1e6 / (time.perf_counter() - start)
        store.delete_many(list(store.keys(namespace)))  # leave the user's store as it was
        results["model"] = runtime.info.to_dict()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    t = results["ttft_ms"]
    print(f"model {results['model']['name']} ({results['model']['kind']}), {len(questions)} sample questions, "
          f"strategy {args.strategy}")
    print(f"TTFT median: cold {t['cold']:.1f} ms · warm {t['warm']:.1f} ms · full prefill {t['full']:.1f} ms")
    print(f"warm / cold = {results['warm_vs_cold']:.2f} · warm / full = {results['warm_vs_full']:.2f}")
    print(f"store get_blob of 1 MiB chunks: {results['store_get_blob_mbps']:.0f} MB/s")
    print("(the HTTP load benchmark is bench/service_load.py in a source checkout)")
    return 0


__all__ = ["cmd_ask", "cmd_bench", "cmd_serve", "cmd_warm", "print_answer"]


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure every selection rule and budget against full prefill and save the cheapest meeting the target;
    fit the transform codec's basis on this model's KV, keep it in the store and save its digest."""
    from ragkv.integrations.calibration_set import codec_texts, corpus_requests, sample_requests
    from ragkv.integrations.corpus import read_corpus
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.middleware.calibration import calibrate
    from ragkv.middleware.codec_calibration import calibrate_transform
    from ragkv.middleware.model_registry import models_dir

    out: dict[str, Any] = {}
    folder = args.out or models_dir()
    with RagRuntime.open(args.store, args.model, dtype=args.dtype, device=args.device,
                         use_calibration=False) as runtime:
        corpus = read_corpus(args.corpus) if args.corpus else None
        if args.what in ("all", "codec"):
            texts = codec_texts(args.model, corpus, args.codec_chunks)
            print(f"model: {runtime.info.name}; transform basis from {len(texts)} documents", file=sys.stderr)
            record, _ = calibrate_transform(runtime.engine, texts, layer_group=args.layer_group)
            out["codec"] = {"path": str(record.save(folder)), "transform_basis": record.transform_basis,
                            "layer_group": record.layer_group, "chunks": record.chunks, "tokens": record.tokens}
        if args.what in ("all", "selection"):
            requests = (corpus_requests(corpus, args.prompts) if corpus is not None
                        else sample_requests(args.model, args.prompts))
            print(f"model: {runtime.info.name}; {len(requests)} prompts, {args.tokens} tokens each", file=sys.stderr)
            calibration = calibrate(runtime.engine, requests, target=args.target, tokens=args.tokens)
            choice = calibration.choice
            out.update({"path": str(calibration.save(folder)), "target": calibration.target,
                        "choice": choice.name if choice else None,
                        "fallback": None if choice else "no configuration met the target: blend recomputes every row",
                        "points": [{"name": p.name, "agreement": p.agreement,
                                    "compute_share": round(p.compute_share, 4)} for p in calibration.points]})
    print(json.dumps(out, indent=1))
    return 0
