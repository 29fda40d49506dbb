"""Service load: 16 HTTP clients fetching 1 MB chunks from the REST service, beside direct TieredStore gets, and
the TTFT of /v1/generate with warm vs cold documents; ``--scenario chat``: N concurrent streaming chat clients
on a real model (``chat_load.py``; results in ``service_load_chat.json``).

Processes, so that nobody's GIL measures anybody else: the service runs in its own process (uvicorn, the app
of ``ragkv serve``, host-memory store); the 16 clients are threads in two client processes using keep-alive
``http.client`` connections (the least client overhead Python offers); the direct baseline is 16 threads
calling ``TieredStore.get_blob`` (what the service sends) on the same chunks in this process.

TTFT: each trial sends fresh documents (cold: computed, stored, blended), then the same documents with another
question (warm: loaded from the store, blended), then full prefill of the same prompt. Trials interleave the
three so that machine noise hits them alike; the figures are medians of the server-reported TTFT. The model
is random-initialised with a real small model's shape (SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads)
and a word-level vocabulary; ``--quick`` uses a tiny one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import chat_load
from harness import Report, median  # (light: no torch; the client children import nothing heavier)

MB = 1 << 20
SHAPES = {  # name -> build_random_model kwargs
    "smollm2-135m": {"layers": 30, "hidden": 576, "heads": 9, "kv_heads": 3, "intermediate": 1536},
    "tiny": {"layers": 3, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128},
}
CLIENT_PROCESSES = 2


def chunk_blob(index: int, geometry: dict[str, Any]) -> tuple[str, bytes]:
    """A chunk of about 1 MiB of KV in the served model's geometry, as a raw container blob under its content
    key (the service stores only what its own model could have made under that key)."""
    import torch

    from ragkv.codecs import get_codec
    from ragkv.codecs.base import dtype_from_name
    from ragkv.kvstore import ChunkKV, ChunkMeta, chunk_key, encode_entry

    dtype = dtype_from_name(geometry["dtype"])
    per_token = geometry["layers"] * 2 * geometry["heads"] * geometry["dim"] * dtype.itemsize
    tokens = max(1, -(-MB // per_token))
    g = torch.Generator().manual_seed(index)
    kv = torch.randn(geometry["layers"], 2, geometry["heads"], tokens, geometry["dim"], generator=g).to(dtype)
    ids = tuple(range(index * tokens, (index + 1) * tokens))
    key = chunk_key(geometry["fingerprint"], "default", ids)
    meta = ChunkMeta(geometry["fingerprint"], ids, position=1, dtype=geometry["dtype"])
    return key, encode_entry(ChunkKV(kv, meta), get_codec("raw"), key=key)


def served_geometry(client: Any) -> dict[str, Any]:
    """The served model's fingerprint, KV geometry and dtype, read from the blob of one warmed chunk."""
    from ragkv.kvstore import read_header

    key = client.post("/v1/warm", json={"texts": ["geometry probe"]}).json()["keys"][0]
    header = read_header(client.get(f"/v1/chunks/{key}").content)
    layers, _, heads, _, dim = header.shape
    return {"fingerprint": header.meta.fingerprint, "layers": layers, "heads": heads, "dim": dim,
            "dtype": header.dtype}


# -- child: the service --------------------------------------------------------------------------------------------
def serve_child(shape: str) -> None:
    import uvicorn

    from ragkv.integrations.models import build_random_model
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.integrations.service import _uvicorn_config, bind_socket, url_of
    from ragkv.integrations.service_app import ServiceState, create_app
    from ragkv.integrations.service_http import ServiceLimits
    from ragkv.integrations.tenants import TenantRegistry
    from ragkv.kvstore import TieredStore

    runtime = RagRuntime(build_random_model(max_positions=8192, **SHAPES[shape]), TieredStore("host:8GB"),
                         own_store=True)
    limits = ServiceLimits(max_chunk_bytes=64 << 20, max_new_tokens=8, max_documents=64)
    app = create_app(ServiceState(runtime=runtime, registry=TenantRegistry.open_access(), limits=limits))
    sock = bind_socket("127.0.0.1", 0)
    print(f"URL {url_of(sock)}", flush=True)
    uvicorn.Server(_uvicorn_config(app, "warning")).run(sockets=[sock])


# -- child: HTTP clients -------------------------------------------------------------------------------------------
def client_child(url: str, threads: int, seconds: float) -> None:
    """Reads the keys (one JSON line), says READY, waits for GO, then loads for ``seconds``."""
    import http.client

    keys = json.loads(sys.stdin.readline())
    print("READY", flush=True)
    sys.stdin.readline()  # GO
    start_at = time.time()

    host, port = url.removeprefix("http://").split(":")
    results: list[tuple[float, int, bool]] = []  # (latency s, bytes, ok)
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        local: list[tuple[float, int, bool]] = []
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        while time.time() < end:
            key = rng.choice(keys)
            t0 = time.perf_counter()
            try:
                conn.request("GET", f"/v1/chunks/{key}")
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and len(body) == int(response.getheader("content-length", "-1"))
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                body, ok = b"", False
            local.append((time.perf_counter() - t0, len(body), ok))
        conn.close()
        with lock:
            results.extend(local)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps(results))


def run_clients(url: str, keys: list[str], clients: int, seconds: float) -> dict[str, float]:
    per = [clients // CLIENT_PROCESSES + (1 if i < clients % CLIENT_PROCESSES else 0) for i in range(CLIENT_PROCESSES)]
    procs = [subprocess.Popen([sys.executable, __file__, "--client-child", url, "--threads", str(n),
                               "--seconds", str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for n in per if n]
    for p in procs:  # every client process starts together, after its imports
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps(keys) + "\n")
        p.stdin.flush()
        if p.stdout.readline().strip() != "READY":
            raise RuntimeError("a client process failed to start")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("GO\n")
        p.stdin.flush()
    outputs = [p.communicate(timeout=seconds + 120)[0] for p in procs]
    samples = [tuple(s) for out in outputs for s in json.loads(out)]
    ok = [s for s in samples if s[2]]
    latencies = sorted(s[0] for s in ok)
    total = sum(s[1] for s in ok)
    return {"requests": len(samples), "errors": len(samples) - len(ok), "mbps": total / MB / seconds,
            "p50_ms": _quantile(latencies, 0.5) * 1e3, "p99_ms": _quantile(latencies, 0.99) * 1e3,
            "rps": len(ok) / seconds}


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(int(q * len(sorted_values)), len(sorted_values) - 1)]


def direct_gets(blobs: dict[str, bytes], threads: int, seconds: float) -> dict[str, float]:
    """16 threads calling TieredStore.get_blob on the same chunks, in this process."""
    from ragkv.kvstore import TieredStore, decode_entry

    store = TieredStore("host:8GB")

    for key, blob in blobs.items():
        store.put(key, decode_entry(blob)[1])
    keys = list(blobs)
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        rng, local = random.Random(seed), []
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            blob = store.get_blob(rng.choice(keys))
            local.append((time.perf_counter() - t0, len(blob or b"")))
        with lock:
            results.extend(local)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    store.close()
    latencies = sorted(r[0] for r in results)
    return {"mbps": sum(r[1] for r in results) / MB / elapsed, "p50_ms": _quantile(latencies, 0.5) * 1e3,
            "p99_ms": _quantile(latencies, 0.99) * 1e3, "requests": len(results)}


# -- TTFT ----------------------------------------------------------------------------------------------------------
def ttft_trials(url: str, trials: int, chunks: int, words: int, seed: int = 0) -> dict[str, list[float]]:
    import httpx

    from ragkv.integrations.sample_corpus import load_sample_corpus

    vocab = [w for w in load_sample_corpus(1).vocabulary if not w.startswith("<")]
    rng = random.Random(seed)
    out: dict[str, list[float]] = {"cold": [], "warm": [], "reuse": [], "full": [], "cold_wall": [],
                                   "warm_wall": [], "warm_hits": []}
    with httpx.Client(base_url=url, timeout=600) as client:
        def ask(documents: list[str], query: str, strategy: str) -> tuple[float, float, dict[str, Any]]:
            t0 = time.perf_counter()
            response = client.post("/v1/generate", json={"query": query, "documents": documents,
                                                         "strategy": strategy, "max_new_tokens": 1})
            wall = time.perf_counter() - t0
            response.raise_for_status()
            data = response.json()
            return data["ttft_ms"], wall * 1e3, data

        ask([" ".join(rng.choice(vocab) for _ in range(words))], "Q k1 ?", "blend")  # first-call overheads
        for trial in range(trials):
            documents = [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(chunks)]
            cold, cold_wall, data = ask(documents, f"Q k{trial % 64} ?", "blend")
            assert not any(d["hit"] for d in data["documents"]), "cold documents must be misses"
            warm, warm_wall, data = ask(documents, f"Q k{(trial + 1) % 64} ?", "blend")
            out["warm_hits"].append(sum(d["hit"] for d in data["documents"]) / len(documents))
            reuse, _, _ = ask(documents, f"Q k{(trial + 3) % 64} ?", "reuse")
            full, _, _ = ask(documents, f"Q k{(trial + 2) % 64} ?", "full")
            for name, value in (("cold", cold), ("warm", warm), ("reuse", reuse), ("full", full),
                                ("cold_wall", cold_wall), ("warm_wall", warm_wall)):
                out[name].append(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite's smoke run")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    parser.add_argument("--seconds", type=float, default=None, help="duration of each load phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES))
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--scenario", default="all", choices=["all", "chunks", "chat"])
    parser.add_argument("--models", default=None, help="chat: comma-separated models (default smollm2-135m-instruct,toy)")
    parser.add_argument("--device", default="cpu", help="chat: where the served model runs")
    parser.add_argument("--levels", default=None, help="chat: comma-separated client counts (default 1,4,8,16)")
    parser.add_argument("--rounds", type=int, default=None, help="chat: requests per client per phase")
    parser.add_argument("--max-tokens", type=int, default=None, help="chat: max_tokens per request")
    parser.add_argument("--warm-docs", type=int, default=None, help="chat: documents warmed beside 8 chat clients")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chat-serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = args.shape or ("tiny" if args.quick else "smollm2-135m")
    if args.serve_child:
        serve_child(shape)
        return
    if args.chat_serve_child:
        chat_load.serve_child(args.model, args.device)
        return
    if args.client_child:
        client_child(args.client_child, args.threads, args.seconds or 1.0)
        return
    if args.scenario in ("all", "chat"):
        run_chat_scenario(args)
    if args.scenario == "chat":
        return
    seconds = args.seconds or (1.0 if args.quick else 20.0)
    trials = args.trials if args.trials is not None else (2 if args.quick else 7)
    chunk_count, words = (4, 16) if args.quick else (8, 96)
    report = Report("service_load", quick=args.quick, out=args.out)
    server = subprocess.Popen([sys.executable, __file__, "--serve-child", "--shape", shape], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = server.stdout.readline() if server.stdout else ""
        if not line.startswith("URL "):
            raise RuntimeError(f"the service did not start: {line!r}")
        url = line.split()[1]
        import httpx

        with httpx.Client(base_url=url, timeout=60) as client:
            geometry = served_geometry(client)
            blobs = dict(chunk_blob(i, geometry) for i in range(32))
            for key, blob in blobs.items():
                client.put(f"/v1/chunks/{key}", content=blob,
                           headers={"content-type": "application/octet-stream"}).raise_for_status()
        http = run_clients(url, list(blobs), args.clients, seconds)
        direct = direct_gets(blobs, args.clients, seconds)
        ttft = ttft_trials(url, trials, chunk_count, words) if trials > 0 else None
    finally:
        server.terminate()
        server.wait(timeout=30)
    size_mb = len(next(iter(blobs.values()))) / MB
    report.setup = {"chunk": f"{geometry['dtype']} KV of the served model ({shape} shape, random init), raw container "
                             f"blob of {size_mb:.3f} MiB under its content key, 32 distinct",
                    "store": "host:8GB (decoded tensors; get_blob encodes raw + CRC32 per request)",
                    "server": "ragkv service app, uvicorn (h11), one process, loopback",
                    "clients": f"{args.clients} threads over {CLIENT_PROCESSES} processes, keep-alive http.client",
                    "seconds": seconds, "model": f"random-init, {shape} shape, float32, word-level vocabulary",
                    "ttft": f"{trials} trials x {chunk_count} documents of {words} words, blend r=0.15 "
                            "(default), max_new_tokens 1, server-reported TTFT, medians",
                    "units": "MB = MiB (as store_throughput)"}
    report.table("chunk gets of 1 MB (16 concurrent)", ["path", "MB/s", "requests", "p50 ms", "p99 ms", "errors"],
                 [["HTTP GET /v1/chunks/{key}", http["mbps"], http["requests"], http["p50_ms"], http["p99_ms"],
                   http["errors"]],
                  ["TieredStore.get_blob (direct)", direct["mbps"], direct["requests"], direct["p50_ms"],
                   direct["p99_ms"], 0]])
    report.figure("chunk_get_throughput_mbps", http["mbps"])
    report.figure("chunk_get_p99_ms", http["p99_ms"])
    report.figure("chunk_get_p50_ms", http["p50_ms"])
    report.figure("errors", http["errors"])
    report.figure("direct_get_throughput_mbps", direct["mbps"])
    report.figure("http_vs_direct", http["mbps"] / direct["mbps"] if direct["mbps"] else None)
    if ttft is not None:
        add_ttft(report, ttft)
    else:
        report.note("TTFT phase skipped (--trials 0)")
    report.note("machine shared with other running jobs: absolute figures vary run to run; ratios are measured "
                "side by side in one run")
    report.write()


def run_chat_scenario(args: argparse.Namespace) -> None:
    models = (args.models or ("toy" if args.quick else "smollm2-135m-instruct,toy")).split(",")
    levels = [int(n) for n in (args.levels or ("1,2" if args.quick else "1,4,8,16")).split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    max_tokens = args.max_tokens or (4 if args.quick else 32)
    warm_docs = args.warm_docs if args.warm_docs is not None else (8 if args.quick else 500)
    report = Report("service_load_chat", quick=args.quick, out=args.out)
    report.setup = {"service": "ragkv service app, uvicorn, one process, loopback, host:8GB store, scheduler "
                               "defaults (max_batch 16, one prefill between decode steps)",
                    "models": f"{', '.join(models)} (real weights), float32, device {args.device}",
                    "clients": f"{levels} concurrent streaming clients (threads), {rounds} requests each, "
                               f"max_tokens {max_tokens}, temperature 0, documents of a sample-corpus question "
                               "(warmed first), default strategy",
                    "warm phase": f"8 chat clients while {warm_docs} fresh documents are warmed, 64 per request",
                    "ttft_p99_vs_1": "TTFT p99 with 8 clients / the median TTFT of one client alone"}
    for model in models:
        chat_load.run_chat(report, __file__, model, args.device, levels, rounds, max_tokens, warm_docs)
    report.note("machine shared with other running jobs: absolute figures vary run to run; ratios are measured "
                "side by side in one run, on one warm server")
    written = report.write()
    if not args.quick:
        chat_load.plot(written, Path(__file__).resolve().parent / "service_load_chat.png")


def add_ttft(report: Report, ttft: dict[str, list[float]]) -> None:
    warm, cold, full = median(ttft["warm"]), median(ttft["cold"]), median(ttft["full"])
    reuse = median(ttft["reuse"])
    report.table("/v1/generate TTFT (ms, median)", ["documents", "TTFT", "wall (client)", "vs cold", "vs full"],
                 [["cold (computed)", cold, median(ttft["cold_wall"]), 1.0, cold / full],
                  ["warm (from the store)", warm, median(ttft["warm_wall"]), warm / cold, warm / full],
                  ["warm, strategy reuse", reuse, None, reuse / cold, reuse / full],
                  ["full prefill", full, None, full / cold, 1.0]])
    report.table("TTFT trials (ms)", ["trial", "cold", "warm", "warm reuse", "full", "warm/cold"],
                 [[i, c, w, r, f, w / c] for i, (c, w, r, f) in
                  enumerate(zip(ttft["cold"], ttft["warm"], ttft["reuse"], ttft["full"]))])
    report.figure("generate_warm_vs_full", warm / full)  # the headline: the same prompt, fully prefilled
    report.figure("generate_warm_vs_cold", warm / cold)  # cold also computes and stores every document
    report.figure("generate_warm_reuse_vs_cold", reuse / cold)
    report.figure("generate_warm_ttft_ms", warm)
    report.figure("generate_cold_ttft_ms", cold)
    report.figure("generate_warm_hit_fraction", statistics.mean(ttft["warm_hits"]))


if __name__ == "__main__":
    main()
