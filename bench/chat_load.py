"""Chat load: N concurrent streaming clients on /v1/chat/completions (the scheduler's continuous batching).

The service runs in its own process (uvicorn, the app of ``ragkv serve``, host-memory store, a real model:
SmolLM2-135M-Instruct or the toy model, float32 on CPU unless ``--device``). Each phase starts N client
threads together (in this process; they only wait on sockets); each client asks ``rounds`` questions back
to back, streaming, with the documents of a sample-corpus question (warmed before the phases, as a RAG
deployment keeps its corpus warm). Per request, client-side: TTFT (request sent -> first content piece),
inter-token latency (gaps between content pieces), output tokens (``usage`` of the stream). Per phase:
aggregate output tokens/s = all tokens / phase wall time, TTFT p50/p99, ITL p99, errors. N=1 is the
baseline: the same requests, warm-up and statistics.

The warm phase: 8 clients chat while another client warms ``warm_docs`` fresh documents through /v1/warm
(64 per request); it reports the chat errors, the warm's errors and how long the warm took.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

WARM_BATCH = 64


def serve_child(model: str, device: str) -> None:
    import uvicorn

    from ragkv.integrations.models import load_model
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.integrations.service import _uvicorn_config, bind_socket, url_of
    from ragkv.integrations.service_app import ServiceState, create_app
    from ragkv.integrations.service_http import ServiceLimits
    from ragkv.integrations.tenants import TenantRegistry
    from ragkv.kvstore import TieredStore

    runtime = RagRuntime(load_model(model, device=device), TieredStore("host:8GB"), own_store=True, max_waiting=64)
    limits = ServiceLimits(max_new_tokens=256, max_documents=64, max_waiting=64)
    app = create_app(ServiceState(runtime=runtime, registry=TenantRegistry.open_access(), limits=limits))
    sock = bind_socket("127.0.0.1", 0)
    print(f"URL {url_of(sock)}", flush=True)
    uvicorn.Server(_uvicorn_config(app, "warning")).run(sockets=[sock])


def start_server(script: str, model: str, device: str) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen([sys.executable, script, "--chat-serve-child", "--model", model, "--device", device],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = server.stdout.readline() if server.stdout else ""
    if not line.startswith("URL "):
        server.terminate()
        raise RuntimeError(f"the service did not start: {line!r}")
    return server, line.split()[1]


def one_chat(client: Any, question: Any, max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion; client-side timings."""
    body = {"messages": [{"role": "user", "content": question.question}], "documents": list(question.chunks),
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                return {"ok": False, "status": response.status_code}
            for line in response.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                data = json.loads(line[5:])
                if data.get("usage"):
                    tokens = int(data["usage"]["completion_tokens"])
                for choice in data.get("choices", []):
                    if choice["delta"].get("content"):
                        stamps.append(time.perf_counter())
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, the phase goes on
        return {"ok": False, "status": type(exc).__name__}
    if not stamps:
        return {"ok": True, "ttft": None, "itl": [], "tokens": tokens}
    return {"ok": True, "ttft": stamps[0] - t0, "itl": [b - a for a, b in itertools.pairwise(stamps)],
            "tokens": tokens}


def chat_phase(url: str, questions: list[Any], clients: int, rounds: int, max_tokens: int,
               offset: int = 0) -> dict[str, Any]:
    """``clients`` threads start together; each asks ``rounds`` questions back to back."""
    import httpx

    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    go = threading.Event()

    def client_main(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            go.wait()
            for r in range(rounds):
                question = questions[(offset + index * rounds + r) % len(questions)]
                outcome = one_chat(client, question, max_tokens)
                with lock:
                    results.append(outcome)

    threads = [threading.Thread(target=client_main, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every client has its connection object before the clock starts
    start = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    itls = sorted(g for r in ok for g in r["itl"])
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "tokens": tokens,
            "seconds": wall, "tokens_per_s": tokens / wall, "ttft_p50_ms": quantile(ttfts, 0.5) * 1e3,
            "ttft_p99_ms": quantile(ttfts, 0.99) * 1e3, "itl_p50_ms": quantile(itls, 0.5) * 1e3,
            "itl_p99_ms": quantile(itls, 0.99) * 1e3, "mean_tokens": tokens / max(1, len(ok))}


def warm_phase(url: str, questions: list[Any], clients: int, rounds: int, max_tokens: int, warm_docs: int,
               tag: str) -> dict[str, Any]:
    """``clients`` chat while one more client warms ``warm_docs`` fresh documents."""
    import httpx

    corpus = [f"{questions[i % len(questions)].chunks[0]} (copy {tag}-{i})" for i in range(warm_docs)]
    warm: dict[str, Any] = {"errors": 0, "computed": 0, "seconds": None}

    def warmer() -> None:
        t0 = time.perf_counter()
        with httpx.Client(base_url=url, timeout=1800) as client:
            for lo in range(0, len(corpus), WARM_BATCH):
                try:
                    response = client.post("/v1/warm", json={"texts": corpus[lo:lo + WARM_BATCH]})
                    if response.status_code != 200:
                        warm["errors"] += 1
                    else:
                        warm["computed"] += int(response.json()["computed"])
                except httpx.HTTPError:
                    warm["errors"] += 1
        warm["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=warmer)
    thread.start()
    time.sleep(0.5)  # the warm is under way when the chats start
    chat = chat_phase(url, questions, clients, rounds, max_tokens, offset=7)
    thread.join()
    return {"chat": chat, "warm": warm}


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(int(q * len(sorted_values)), len(sorted_values) - 1)]


def run_chat(report: Any, script: str, model: str, device: str, levels: list[int], rounds: int, max_tokens: int,
             warm_docs: int) -> None:
    """Every phase on one served ``model``; tables and figures into ``report`` (names prefixed for the toy)."""
    import httpx

    from ragkv.integrations.sample_corpus import sample_for_model

    corpus = sample_for_model(None if model == "smollm2-135m-instruct" else model)
    questions = list(corpus.questions)
    server, url = start_server(script, model, device)
    try:
        with httpx.Client(base_url=url, timeout=1800) as client:
            docs = sorted({c for q in questions for c in q.chunks})
            for lo in range(0, len(docs), WARM_BATCH):
                client.post("/v1/warm", json={"texts": docs[lo:lo + WARM_BATCH]}).raise_for_status()
        chat_phase(url, questions, 2, 1, max_tokens)  # warm-up: first-call overheads, both paths
        phases = [chat_phase(url, questions, n, rounds, max_tokens) for n in levels]
        loaded = warm_phase(url, questions, 8, rounds, max_tokens, warm_docs, tag=str(time.time_ns())) \
            if warm_docs else None
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=60)
    single = phases[0]
    prefix = "" if model == "smollm2-135m-instruct" else f"{model}_"
    report.table(f"streaming chat, {model} ({device}): {rounds} requests per client, max_tokens {max_tokens}",
                 ["clients", "requests", "errors", "tokens", "tokens/s", "vs 1 client", "TTFT p50 ms",
                  "TTFT p99 ms", "p99 vs 1 client", "ITL p50 ms", "ITL p99 ms"],
                 [[p["clients"], p["requests"], p["errors"], p["tokens"], p["tokens_per_s"],
                   p["tokens_per_s"] / single["tokens_per_s"], p["ttft_p50_ms"], p["ttft_p99_ms"],
                   p["ttft_p99_ms"] / single["ttft_p50_ms"], p["itl_p50_ms"], p["itl_p99_ms"]] for p in phases])
    for p in phases:
        n = p["clients"]
        report.figure(f"{prefix}chat_{n}_clients_tokens_per_s", p["tokens_per_s"])
        report.figure(f"{prefix}chat_{n}_clients_ttft_p99_ms", p["ttft_p99_ms"])
        report.figure(f"{prefix}chat_{n}_clients_itl_p99_ms", p["itl_p99_ms"])
        report.figure(f"{prefix}chat_{n}_clients_errors", p["errors"])
    eight = next((p for p in phases if p["clients"] == 8), None)
    if eight is not None:
        report.figure(f"{prefix}chat_8_clients_tokens_per_s_vs_1", eight["tokens_per_s"] / single["tokens_per_s"])
        # one client's TTFT: its median (the p99 of a handful of single requests is its maximum)
        report.figure(f"{prefix}chat_8_clients_ttft_p99_vs_1", eight["ttft_p99_ms"] / single["ttft_p50_ms"])
    if loaded is not None:
        chat, warm = loaded["chat"], loaded["warm"]
        report.table(f"8 chat clients while {warm_docs} documents are warmed, {model}",
                     ["chat requests", "chat errors", "chat tokens/s", "TTFT p99 ms", "ITL p99 ms",
                      "warm requests failed", "documents computed", "warm seconds"],
                     [[chat["requests"], chat["errors"], chat["tokens_per_s"], chat["ttft_p99_ms"],
                       chat["itl_p99_ms"], warm["errors"], warm["computed"], warm["seconds"]]])
        report.figure(f"{prefix}chat_during_warm_errors", chat["errors"] + warm["errors"])
        report.figure(f"{prefix}chat_during_warm_tokens_per_s", chat["tokens_per_s"])
    steps = {int(line.split('le="')[1].split('"')[0].split(".")[0]) if "+Inf" not in line else "inf":
             int(float(line.split()[-1])) for line in metrics.splitlines()
             if line.startswith("ragkv_decode_batch_size_bucket")}
    report.note(f"{model}: decode steps by batch size (cumulative, from /metrics): {steps}")


def plot(results_json: Path, path: Path) -> bool:
    """Aggregate tokens/s and TTFT p99 against concurrent clients, one line per model (from the results JSON)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    data = json.loads(results_json.read_text())
    tables = [t for t in data["tables"] if t["title"].startswith("streaming chat")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    for table in tables:
        cols = table["columns"]
        clients = [r[cols.index("clients")] for r in table["rows"]]
        label = table["title"].split(", ")[1].split(":")[0]
        left.plot(clients, [r[cols.index("vs 1 client")] for r in table["rows"]], marker="o", label=label)
        right.plot(clients, [r[cols.index("p99 vs 1 client")] for r in table["rows"]], marker="o", label=label)
    left.axhline(3, color="grey", ls="--", lw=1, label="goal at 8 clients (>= 3)")
    right.axhline(3, color="grey", ls="--", lw=1, label="goal at 8 clients (<= 3)")
    left.set(xlabel="concurrent streaming clients", ylabel="aggregate tokens/s / one client's",
             title="throughput vs one client")
    right.set(xlabel="concurrent streaming clients", ylabel="TTFT p99 / one client's median TTFT",
              title="TTFT p99 vs one client", yscale="log")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ragkv service, /v1/chat/completions streaming, 2-core CPU (real models)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
