"""The ``ragkv`` command line: ``serve`` (the REST service, the README's main job), ``warm`` (precompute a
corpus, resumable), ``ask`` (one RAG question with the TTFT split), ``stats``, ``bench``, and ``demo`` (a
store round trip without a model).

Model-backed subcommands live in ``cli_commands`` and are imported only when they run, so ``--help``,
``demo`` and ``stats`` stay fast and need no model extras.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from ragkv.integrations.cli_simulate import add_simulate_commands
from ragkv.kvstore import ChunkKV, ChunkMeta, RagKVError, TieredStore, chunk_key
from ragkv.middleware.abstract_selection import AbstractsConfig


def _open(spec: str | None) -> TieredStore:
    return TieredStore(spec)


def cmd_demo(args: argparse.Namespace) -> int:
    """Write a few chunk-shaped tensors, read them back through every tier, print what happened."""
    with _open(args.store) as store:
        print(f"store: {store}")
        for name, tier in zip(store.names, store.tiers):
            path = getattr(tier.config, "path", "") or getattr(tier.config, "url", "")
            cap = tier.config.capacity_bytes
            print(f"  {name:<8} codec={tier.codec.name:<8} capacity={cap if cap is not None else 'unbounded'} {path}")
        g = torch.Generator().manual_seed(0)
        keys = []
        start = time.perf_counter()
        for i in range(args.chunks):
            ids = tuple(range(i * 1000, i * 1000 + args.tokens))
            # kv: [layers, 2, kv_heads, tokens, head_dim], the shape of a small model's chunk cache
            kv = torch.randn(4, 2, 2, args.tokens, 64, generator=g).to(torch.float16)
            chunk = ChunkKV(kv, ChunkMeta(fingerprint="demo-model", token_ids=ids, position=1))
            key = chunk_key("demo-model", "demo", ids)
            store.put(key, chunk)
            keys.append((key, chunk))
        store.flush()
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        ok = all(got is not None and torch.equal(got.kv, c.kv)
                 for got, (_, c) in zip(store.get_many([k for k, _ in keys]), keys))
        get_s = time.perf_counter() - start
        mb = sum(c.nbytes for _, c in keys) / 1e6
        print(f"put {len(keys)} chunks ({mb:.1f} MB) in {put_s * 1e3:.1f} ms; "
              f"read back {'exactly' if ok else 'WITH ERRORS'} in {get_s * 1e3:.1f} ms")
        for key, _ in keys[:3]:
            print(f"  {key} in {store.locate(key)}")
        if not args.keep:
            store.delete_many([k for k, _ in keys])
        return 0 if ok else 1


def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args.store) as store:
        stats = store.stats()
        for name, tier in zip(store.names, store.tiers):
            stats["tiers"][name]["entries"] = sum(1 for _ in tier.keys())  # noqa: SIM118 - a tier is no mapping
        print(json.dumps(stats, indent=2, default=str))
    return 0


def _lazy(name: str, module: str = "cli_commands") -> Any:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(f"ragkv.integrations.{module}"), name)(args))
    return run


def _model_options(p: argparse.ArgumentParser) -> None:
    # also accepted after the subcommand (``ragkv serve --store ...``); SUPPRESS keeps the global value otherwise
    p.add_argument("--store", default=argparse.SUPPRESS, help="store spec or config file (as the global --store)")
    p.add_argument("--model", default=None,
                   help="a registered model (smollm2-135m-instruct, the default; toy) or a local HuggingFace "
                        "model directory (Llama, Qwen2/3, Mistral; safetensors)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: as stored; SmolLM2: float32)")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (a GPU when there is one, default), cpu, cuda or cuda:N; on a "
                        "GPU the default store also gets a device tier")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragkv", description="KV-cache store and middleware for RAG")
    parser.add_argument("--store", default=None,
                        help="store spec, e.g. 'host:4GB,disk:/var/cache/ragkv:50GB,redis://127.0.0.1:6379' "
                             "or a .json/.toml config file (default: $RAGKV_STORE, else host + disk under the "
                             "user cache dir)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the REST service (warms a sample corpus, prints an example)")
    _model_options(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--near-duplicates", action="store_true",
                       help="repair a missing document from a stored near-duplicate (an edited copy) instead of "
                            "computing it; off by default")
    serve.add_argument("--role", choices=("both", "prefill", "decode"), default="both",
                       help="prefill: prepare prompts and publish them (/v1/prefill); decode: decode what a prefill "
                            "server published (/v1/decode); both (default): every answer endpoint. Prefill and "
                            "decode servers share a store (Redis or a disk both can reach)")
    serve.add_argument("--record-trace", default=None, metavar="FILE",
                       help="append every answered request (its documents' keys and sizes) to this trace, for "
                            "ragkv simulate")
    serve.add_argument("--abstracts", action="store_true",
                       help="store a key abstract beside each chunk and leave out of a prompt the documents whose "
                            "attention bound is far below the others' (never fetched); off by default")
    serve.add_argument("--abstract-threshold", type=float, default=AbstractsConfig.threshold, metavar="GAP",
                       help="leave out a document whose mean bound gap is below -GAP (natural-log units; default "
                            "%(default)s)")
    serve.add_argument("--api-keys", default=None, metavar="FILE",
                       help="JSON/TOML file mapping API keys to tenants (default: open, one tenant, loopback only)")
    serve.add_argument("--max-chunk-bytes", type=int, default=256 << 20, help="largest chunk blob a PUT may send")
    serve.add_argument("--max-json-bytes", type=int, default=4 << 20, help="largest JSON request body")
    serve.add_argument("--max-documents", type=int, default=64, help="documents per generate request")
    serve.add_argument("--max-new-tokens", type=int, default=512, help="largest max_new_tokens a request may ask")
    serve.add_argument("--max-waiting", type=int, default=16, help="model requests queued before 429")
    serve.add_argument("--no-sample", action="store_true", help="do not warm the sample corpus at start-up")
    serve.add_argument("--allow-open-remote", action="store_true",
                       help="serve a non-loopback address without API keys (everyone is one tenant)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_lazy("cmd_serve"))

    warm = sub.add_parser("warm", help="precompute the chunk KV of a corpus (resumable: stored chunks are skipped)")
    warm.add_argument("corpus", help="a directory of .txt/.md files, a text file, or a JSONL file")
    _model_options(warm)
    warm.add_argument("--namespace", default="default", help="the tenant namespace to store into")
    warm.add_argument("--split", default="paragraph", choices=["paragraph", "file"],
                      help="chunk text files by blank-line paragraphs or whole files")
    warm.add_argument("--text-field", default="text", help="JSONL: the field holding each chunk's text")
    warm.add_argument("--batch-size", type=int, default=32)
    warm.add_argument("--index", default=None, metavar="DIR", help="also add the chunks to this FAISS index")
    warm.add_argument("--embedder", default="minilm", help="embedder for --index: minilm (default) or hashing")
    warm.set_defaults(func=_lazy("cmd_warm"))

    ask = sub.add_parser("ask", help="answer one RAG question and show the TTFT split")
    ask.add_argument("question", nargs="?", default=None)
    _model_options(ask)
    ask.add_argument("--doc", action="append", help="a document text (repeat for several)")
    ask.add_argument("--docs", default=None, metavar="PATH", help="documents from a corpus file or directory")
    ask.add_argument("--index", default=None, metavar="DIR", help="retrieve documents from this FAISS index")
    ask.add_argument("-k", type=int, default=4, help="documents to retrieve with --index")
    ask.add_argument("--embedder", default=None, help="embedder of --index (default: the one it was built with)")
    ask.add_argument("--sample", type=int, default=None, metavar="N", help="ask sample corpus question N")
    ask.add_argument("--system", default=None, help="a system prefix")
    ask.add_argument("--strategy", default="blend", help="full | prefix | reuse | blend | compress | auto")
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument("--namespace", default="default")
    ask.add_argument("--compare", action="store_true", help="also time full prefill of the same prompt")
    ask.add_argument("--url", default=None, help="ask a running ragkv service instead of loading the model")
    ask.add_argument("--api-key", default=os.environ.get("RAGKV_API_KEY"),
                     help="API key for --url (default: $RAGKV_API_KEY)")
    ask.add_argument("--json", action="store_true", help="print the result as JSON")
    ask.set_defaults(func=_lazy("cmd_ask"))

    calib = sub.add_parser("calibrate", help="measure each blend selection rule against full prefill and store "
                                             "the cheapest meeting the target agreement for this model; fit the "
                                             "transform codec's basis on this model's KV and keep it in the store")
    _model_options(calib)
    calib.add_argument("--corpus", default=None, metavar="PATH",
                       help="your own chunks (as for warm), asked generic questions (default: the bundled sample)")
    calib.add_argument("--prompts", type=int, default=8, help="calibration prompts")
    calib.add_argument("--target", type=float, default=0.95, help="agreement with full prefill to meet")
    calib.add_argument("--tokens", type=int, default=16, help="greedy tokens compared per prompt")
    calib.add_argument("--what", choices=("all", "selection", "codec"), default="all",
                       help="calibrate the blend selection, the transform codec's basis, or both (default)")
    calib.add_argument("--codec-chunks", type=int, default=64,
                       help="documents whose KV the transform basis is fitted on")
    calib.add_argument("--layer-group", type=int, default=1, help="layers sharing one transform basis")
    calib.add_argument("--out", default=None, metavar="DIR",
                       help="where to save it (default: the models directory, where the service reads it)")
    calib.set_defaults(func=_lazy("cmd_calibrate"))

    stats = sub.add_parser("stats", help="print the store's tiers, entries and statistics as JSON")
    stats.set_defaults(func=cmd_stats)

    bench = sub.add_parser("bench", help="quick in-process benchmark: TTFT cold/warm/full and store gets")
    _model_options(bench)
    bench.add_argument("--strategy", default="blend")
    bench.add_argument("--questions", type=int, default=8)
    bench.add_argument("--seconds", type=float, default=2.0, help="duration of the store get loop")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=_lazy("cmd_bench"))

    add_simulate_commands(sub, lambda name: _lazy(name, "cli_simulate"))

    demo = sub.add_parser("demo", help="write and read back a few chunks through the store (no model)")
    demo.add_argument("--chunks", type=int, default=8)
    demo.add_argument("--tokens", type=int, default=256)
    demo.add_argument("--keep", action="store_true", help="leave the demo chunks in the store")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RagKVError as exc:
        print(f"ragkv: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ragkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
